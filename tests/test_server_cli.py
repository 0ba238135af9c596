"""The `minivllm` command: flags derived from EngineArgs, generate, write-tiny, and a `serve` smoke
test as a real subprocess (API key, served model name, RunPod routes, SIGTERM)."""

import os
import signal
import subprocess
from types import SimpleNamespace

import httpx
import pytest

from conftest import free_port, minivllm_command, wait_until_up

from minivllm.cli import build_parser, engine_args_from, main
from minivllm.config import EngineArgs


def serve_parser():
    parser = build_parser()
    return parser, parser._subparsers._group_actions[0].choices["serve"]


def test_every_engine_arg_is_a_flag():
    _, serve = serve_parser()
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for name in EngineArgs.model_fields:
        assert "--" + name.replace("_", "-") in flags, name
    args = build_parser().parse_args(["serve", "some/repo", "--max-model-len", "256", "--no-enable-prefix-caching",
                                      "--dtype", "float32", "--kv-cache-space-gib", "0.5"])
    engine_args = engine_args_from(serve, args)
    assert engine_args.model_dump() == EngineArgs(model="some/repo", max_model_len=256, enable_prefix_caching=False,
                                                  dtype="float32", kv_cache_space_gib=0.5).model_dump()


@pytest.mark.parametrize("argv,message", [
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs: Input should be greater than or equal to 1"),
    (["serve", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["serve", "a/b", "--model", "c/d"], "MODEL 'a/b' and --model 'c/d' disagree"),
])
def test_bad_flags_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_write_tiny_and_generate(tmp_path, capsys):
    path = str(tmp_path / "tiny")
    assert main(["write-tiny", path, "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip() == path
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert main(["generate", "Hello", "--max-tokens", "3", "--temperature", "0", "--model", path,
                 "--max-model-len", "64", "--num-kv-blocks", "16"]) == 0
    assert capsys.readouterr().out.strip()


def test_sigterm_turns_ready_off_first():
    import uvicorn

    from minivllm.cli import draining_server

    from minivllm.server.app import ServerState

    app = SimpleNamespace(state=SimpleNamespace(server=ServerState(models=None, drain_s=1.0)))
    server = draining_server(uvicorn.Config(app))
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.server.draining and server.should_exit


def test_serve_subprocess(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = minivllm_command()
    proc = subprocess.Popen(
        cmd + ["serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256", "--num-kv-blocks", "64",
               "--api-key", "k3y", "--served-model-name", "smoke", "--log-level", "warning"],
        env={**os.environ, "LOCAL_MODEL_ARGS_PATH": str(tmp_path / "absent.json")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    auth = {"Authorization": "Bearer k3y"}
    try:
        wait_until_up(proc, url + "/ready", timeout=60)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["smoke"] and models["data"][0]["max_model_len"] == 256
        chat = httpx.post(url + "/openai/v1/chat/completions", headers=auth, timeout=30,
                          json={"model": "smoke", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 2
        job = httpx.post(url + "/runsync", headers=auth, timeout=30,
                         json={"input": {"openai_route": "/v1/models", "openai_input": {}}})
        assert job.status_code == 200 and job.json()["status"] == "COMPLETED", job.text  # RunPod emulation
        assert job.json()["output"][0]["data"][0]["id"] == "smoke"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # a drained shutdown is a clean exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

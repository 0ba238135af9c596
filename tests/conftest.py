import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

# Tests never touch the network and never write into the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if "MINIVLLM_CACHE" not in os.environ:
        os.environ["MINIVLLM_CACHE"] = str(tmp_path_factory.mktemp("minivllm-cache"))


@pytest.fixture(scope="session")
def tiny_mxfp4(tmp_path_factory):
    """MXFP4 experts, a 16-token sliding window (so test prompts cross it)."""
    from minivllm.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-mxfp4"), seed=1, sliding_window=16)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """An unquantized fp32 checkpoint written by transformers' own save_pretrained, another shape."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=201088, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=3, sliding_window=12,
        eos_token_id=[200002, 199999, 200012], pad_token_id=199999,
    )
    torch.manual_seed(2)
    model = GptOssForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(std=1.0 if ("embed" in name or "sinks" in name) else 0.2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-dense"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine():
    """One AsyncEngine on the embedded tiny model per test module that asks for it."""
    from minivllm import AsyncEngine, EngineArgs

    engine = AsyncEngine.from_engine_args(EngineArgs(model=None, num_kv_blocks=256, max_model_len=1024))
    yield engine
    engine.shutdown()


def hf_model(path: str):
    from transformers import GptOssForCausalLM, Mxfp4Config

    with open(os.path.join(path, "config.json")) as f:
        quantized = "quantization_config" in f.read()
    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}
    return GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def mixed_prompts(seed: int = 0, lengths=(3, 9, 17, 30, 45, 70)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 199_000, (n,), generator=g).tolist() for n in lengths]


def finished_outputs(engine) -> dict:
    """Step an LLMEngine until nothing is left; each request's final RequestOutput, by request id."""
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def recorded_steps(engine) -> list[list[tuple[str, int]]]:
    """From now on, each step's (request id, tokens run) pairs, as the scheduler picks them."""
    steps, schedule = [], engine.scheduler.schedule

    def recording():
        batch = schedule()
        steps.append([(seq.request.request_id, n) for seq, n in batch])
        return batch

    engine.scheduler.schedule = recording
    return steps


def minivllm_command() -> list[str]:
    """How to run the `minivllm` console script (its module when the script is not on PATH)."""
    exe = shutil.which("minivllm")
    return [exe] if exe else [sys.executable, "-m", "minivllm.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server process exited {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.2)


@contextlib.contextmanager
def serve_in_thread(app):
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

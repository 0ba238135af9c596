"""Tensor parallelism: tp=2 (two CPU ranks over gloo) gives tp=1's tokens and logits, holds half
the weights per rank, and fails fast and clearly when a rank dies or tp does not fit the model."""

import asyncio
import os
import signal
import threading
import time

import pytest
import torch
from conftest import mixed_prompts

from minivllm import LLM, AsyncEngine, EngineArgs, SamplingParams
from minivllm.distributed.parallel_state import shard
from minivllm.distributed.workers import TensorParallelError
from minivllm.engine.async_engine import EngineDeadError
from minivllm.model.tiny import CYCLE, write_copy_checkpoint, write_copy_eagle3_head, write_tiny_checkpoint

# Small enough that prompts are prefilled in 5-token chunks and sequences get preempted, with
# shared prefixes hitting the prefix cache: all three paths in one run.
STRESS = dict(block_size=4, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=5)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank():
    # Worker ranks take the engine process's thread count: 1 each, on a machine of 2 shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_uneven(tmp_path_factory):
    """Shards that split unevenly at tp=2: 3 MXFP4 blocks of expert intermediate, an odd vocabulary."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-uneven"), seed=3, intermediate_size=96,
                                 vocab_size=200001, sliding_window=16)


@pytest.fixture(scope="class", params=["tiny_mxfp4", "tiny_dense", "tiny_uneven"])
def engines(request):
    """(tp=1 LLM, tp=2 LLM) on one checkpoint, both with STRESS's settings. Class-scoped: the
    tp=2 engine is shut down before the tests below start theirs (one group per process)."""
    path = request.getfixturevalue(request.param)
    tp1 = LLM(path, **STRESS)
    tp2 = LLM(path, tensor_parallel_size=2, **STRESS)
    yield tp1, tp2
    tp2.engine.shutdown()


def _prompts() -> list[dict]:
    base = mixed_prompts(seed=3, lengths=(30,))[0]
    tails = mixed_prompts(seed=4, lengths=(3, 11, 1))
    return [{"prompt_token_ids": p} for p in [base + t for t in tails] + mixed_prompts(seed=5, lengths=(25, 40))]


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _record_logits(llm: LLM) -> list[torch.Tensor]:
    """Every logits tensor the engine computes from now on (each step's next-token logits)."""
    model = llm.engine.runner.model
    compute, seen = model.compute_logits, []

    def recording(hidden):
        logits = compute(hidden)
        seen.append(logits.clone())
        return logits

    model.compute_logits = recording
    return seen


class TestTp2AgainstTp1:
    def test_tp2_tokens_and_logits_equal_tp1_with_chunking_caching_and_preemption(self, engines):
        tp1, tp2 = engines
        logits1, logits2 = _record_logits(tp1), _record_logits(tp2)
        out1 = tp1.generate(_prompts(), GREEDY, use_tqdm=False)
        out2 = tp2.generate(_prompts(), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out2] == [o.outputs[0].token_ids for o in out1]
        assert len(logits2) == len(logits1) > 20
        for a, b in zip(logits1, logits2):
            assert b.shape == a.shape and b.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        # The run did exercise every path, on both engines alike.
        for llm in (tp1, tp2):
            assert llm.engine.scheduler.num_preemptions > 0
            assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        assert any(o.num_cached_tokens > 0 for o in out2)


    def test_tp2_abort_n2_and_logprobs(self, engines):
        tp1, tp2 = engines
        prompts = _prompts()[:3]
        sampled = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=10, logprobs=3, prompt_logprobs=3)
        expected, got = (llm.generate(prompts, sampled, use_tqdm=False) for llm in (tp1, tp2))
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
        assert all(len(o.outputs) == 2 for o in got)
        for a, b in zip(expected, got):  # prompt logprobs take the rank-0 logits path in slices
            for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert pa.keys() == pb.keys()
                assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)

        engine = tp2.engine
        engine.add_request("gone", prompts[0], GREEDY)
        engine.add_request("kept", prompts[1], GREEDY)
        for _ in range(8):
            engine.step()
        assert engine.abort_request("gone") is not None
        final = None
        while engine.has_unfinished_requests():
            final = next((o for o in engine.step() if o.request_id == "kept" and o.finished), final)
        reference = tp1.generate([prompts[1]], GREEDY, use_tqdm=False)[0]
        assert final.outputs[0].token_ids == reference.outputs[0].token_ids
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


    def test_each_rank_holds_half_the_weights(self, engines):
        tp1, tp2 = engines
        full = _param_bytes(tp1.engine.runner.model)
        rank0 = _param_bytes(tp2.engine.runner.model.model)  # the driver wraps rank 0's shard
        # Only norms and the router are replicated (a few KB): everything else is split in two.
        assert 0.5 <= rank0 / full < 0.51, (rank0, full)
        config = tp1.engine.model_config
        kv1, kv2 = tp1.engine.runner.kv_cache, tp2.engine.runner.kv_cache
        assert kv2.shape[4] == config.num_key_value_heads // 2 and kv2.numel() * 2 == kv1.numel()


@pytest.mark.parametrize("own_embedding", [False, True])
def test_eagle3_at_tp2_drafts_and_decodes_as_at_tp1(tmp_path, own_embedding):
    """The head runs whole on rank 0 over rank 0's residual stream; a head sharing the target's
    embedding gets a whole copy of it (the target's is split by vocabulary)."""
    target = write_copy_checkpoint(str(tmp_path / "copy"), shift=1)
    head = write_copy_eagle3_head(str(tmp_path / "head"), target, own_embedding=own_embedding)
    spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 2}
    prompts = [{"prompt_token_ids": [7 + i] + CYCLE[i * 5:i * 5 + 5] * 2} for i in range(4)]
    results = []
    for tp in (1, 2):
        llm = LLM(target, tensor_parallel_size=tp, speculative_config=spec, **STRESS)
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        results.append(([o.outputs[0].token_ids for o in outputs], llm.engine.stats()))
        if tp == 2:
            assert llm.engine.runner.draft_kv_cache is not None
            llm.engine.shutdown()
    (tokens1, stats1), (tokens2, stats2) = results
    assert tokens2 == tokens1
    assert stats2["spec_decode_num_accepted_tokens"] == stats1["spec_decode_num_accepted_tokens"] > 0


def test_tp1_never_touches_torch_distributed(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=16, max_model_len=64)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
    assert llm.engine.runner.workers is None and not torch.distributed.is_initialized()
    assert not any(hasattr(p, "tp_shard") for p in llm.engine.runner.model.parameters())


def test_tp_must_divide_the_kv_heads(tiny_mxfp4):
    # tiny_mxfp4 has 4 query heads and 2 KV heads.
    for tp in (3, 4):
        with pytest.raises(ValueError, match=rf"tensor_parallel_size {tp} must divide .*heads"):
            LLM(tiny_mxfp4, tensor_parallel_size=tp, num_kv_blocks=16)


def test_tensor_parallel_size_reaches_the_engine_from_env_and_cli():
    from minivllm.cli import build_parser, engine_args_from
    from minivllm.worker.config import WorkerConfig

    env = WorkerConfig.load({"TENSOR_PARALLEL_SIZE": "2"}, local_args_path="/nonexistent.json")
    assert env.engine_args().tensor_parallel_size == 2
    parser = build_parser()
    args = parser.parse_args(["serve", "--tensor-parallel-size", "4"])
    assert engine_args_from(args.parser, args).tensor_parallel_size == 4


def test_shards_cover_whole_mxfp4_blocks():
    # gpt-oss: intermediate 2880 = 90 MXFP4 blocks; tp 4 and 8 do not divide 90.
    for tp in (1, 2, 4, 8):
        cuts = [shard(2880, r, tp, unit=32) for r in range(tp)]
        assert cuts[0][0] == 0 and cuts[-1][1] == 2880
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
        assert all(s % 32 == 0 and e > s for s, e in cuts)


def test_a_killed_rank_fails_the_engine_fast(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, tensor_parallel_size=2, num_kv_blocks=32, max_model_len=64)
    try:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)
        proc = llm.engine.runner.workers.procs[0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 died \(exit code -9\)"):
            llm.generate([{"prompt_token_ids": [4, 5, 6]}], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 10
        with pytest.raises(TensorParallelError):  # and every later step, at once
            llm.generate([{"prompt_token_ids": [7]}], GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()


def test_a_rank_dying_mid_step_stops_the_async_engine(tiny_mxfp4):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, tensor_parallel_size=2, num_kv_blocks=32,
                                                     max_model_len=64))
    workers = engine.engine.runner.workers
    send = workers.send

    def send_then_kill(header):  # rank 1 dies after taking the step: rank 0 is left in a collective
        send(header)
        if header[0] == "logits" and killed.is_set():
            os.kill(workers.procs[0].pid, signal.SIGKILL)
            workers.procs[0].join(5)

    async def run(prompt):
        async for out in engine.generate({"prompt_token_ids": prompt}, GREEDY):
            last = out
        return last

    killed = threading.Event()
    workers.send = send_then_kill
    try:
        assert len(asyncio.run(run([1, 2, 3])).outputs[0].token_ids) == GREEDY.max_tokens
        killed.set()
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(run([4, 5, 6]), 20))
        assert time.monotonic() - start < 10
        assert not engine.is_running  # /health answers 503
        assert isinstance(engine.last_error, TensorParallelError)
        assert "rank 1 died (exit code -9)" in str(engine.last_error)
    finally:
        engine.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_tp2_tokens_equal_tp1(tiny_mxfp4):
    prompts = _prompts()
    # fp32 and the reference ops: the two runs differ only in how the sums are split.
    args = dict(dtype="float32", ops_backend="reference", block_size=16, num_kv_blocks=64, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in LLM(tiny_mxfp4, **args).generate(prompts, GREEDY, use_tqdm=False)]
    tp2 = LLM(tiny_mxfp4, tensor_parallel_size=2, **args)
    try:
        assert [o.outputs[0].token_ids for o in tp2.generate(prompts, GREEDY, use_tqdm=False)] == expected
    finally:
        tp2.engine.shutdown()

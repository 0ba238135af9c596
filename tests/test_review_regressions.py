"""Regression tests for engine/serving bugs found in review (each failed before its fix)."""

import asyncio

import pytest

from minivllm import LLM, AsyncEngine, EngineArgs, SamplingParams
from minivllm.sampling_params import RequestOutputKind

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_mxfp4):
    return LLM(tiny_mxfp4, num_kv_blocks=128, block_size=4, max_model_len=128)


def _fail_next_execute(engine):
    """Make the model runner raise once, as a device error in the middle of a step would."""
    runner = engine.runner
    real = runner.execute

    def boom(*args, **kwargs):
        runner.execute = real
        raise RuntimeError("injected step failure")

    runner.execute = boom


def test_failed_step_does_not_poison_the_prefix_cache(llm):
    engine = llm.engine
    prompt = list(range(1000, 1030))  # several full blocks
    params = SamplingParams(max_tokens=4, **GREEDY)
    expected = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=4, **GREEDY),
                            use_tqdm=False)[0].outputs[0].token_ids
    other = list(range(5000, 5030))
    want_other = llm.generate({"prompt_token_ids": other}, params, use_tqdm=False)[0].outputs[0].token_ids
    engine.block_manager.hash_to_block.clear()  # forget both prompts
    # The step that would have written `other`'s prompt K/V fails: its blocks were never written.
    engine.add_request("dead", {"prompt_token_ids": other}, params)
    _fail_next_execute(engine)
    assert engine.step() == []
    (failed_id, error), = engine.take_failed()  # the request alone in the failed step fails; it is freed
    assert failed_id == "dead" and "injected" in str(error)
    # Overwrite the never-written blocks' pages with another prompt's K/V.
    assert llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    out = llm.generate({"prompt_token_ids": other}, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want_other
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_llm_generate_recovers_after_a_failed_step(llm, monkeypatch):
    engine = llm.engine
    params = SamplingParams(max_tokens=3, **GREEDY)

    def broken(*args, **kwargs):  # fails for every request, also when retried one request at a time
        raise RuntimeError("injected step failure")

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "execute", broken)
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate(["one", "two"], params, use_tqdm=False)
    # The failed call's requests must not linger (holding KV blocks, running inside later calls).
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    out = llm.generate("three", params, use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3


def test_cumulative_output_logprobs_are_a_snapshot(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=5, logprobs=2, **GREEDY)
    engine.add_request("snap", "snapshot me", params)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            first = first or out
    c = first.outputs[0]
    assert len(c.token_ids) == 1
    assert len(c.logprobs) == len(c.token_ids)  # not the live list the engine keeps appending to


def test_out_of_vocab_stop_token_id_cannot_fail_other_requests(tiny_mxfp4):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=64, block_size=4,
                                                     max_model_len=64))

    async def run(params):
        out = None
        async for out in engine.generate("hello", params):
            pass
        return out

    async def main():
        good = SamplingParams(max_tokens=4, **GREEDY)
        bad = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**7], **GREEDY)
        return await asyncio.gather(run(good), run(bad), return_exceptions=True)

    try:
        good, bad = asyncio.run(main())
    finally:
        engine.shutdown()
    assert not isinstance(good, BaseException), good
    assert len(good.outputs[0].token_ids) == 4
    assert isinstance(bad, ValueError) and "stop_token_ids" in str(bad)


def test_abort_ends_a_pending_stream(tiny_mxfp4):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=64, block_size=4,
                                                     max_model_len=128))

    async def main():
        params = SamplingParams(max_tokens=100, output_kind=RequestOutputKind.DELTA, **GREEDY)
        outs = []

        async def consume():
            async for out in engine.generate("abort me", params, "ab"):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.abort("ab")
        await asyncio.wait_for(task, 10)  # the consumer is told, rather than waiting forever
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_preemption_prefers_the_less_important_running_sequence(tiny_mxfp4):
    # 8 blocks of 4 tokens: prompts of 8 and 10 tokens cannot both grow by 12; "high" (admitted
    # second, so later in the running list) is the first to need a block none is free for.
    llm = LLM(tiny_mxfp4, num_kv_blocks=8, block_size=4, max_model_len=32, enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=12, **GREEDY)
    engine.add_request("low", {"prompt_token_ids": list(range(100, 108))}, params, priority=5)
    engine.step()  # "low" runs first: admitted ahead of "high" in the running list
    engine.add_request("high", {"prompt_token_ids": list(range(200, 210))}, params, priority=-1)
    high = engine.requests["high"].seqs[0]
    preempted_high = False
    finished = []
    while engine.has_unfinished_requests():
        before = engine.scheduler.num_preemptions
        finished += [o.request_id for o in engine.step() if o.finished]
        if engine.scheduler.num_preemptions > before and high in engine.scheduler.waiting:
            preempted_high = True
    assert engine.scheduler.num_preemptions > 0
    assert not preempted_high
    assert finished == ["high", "low"]


def test_preemption_and_chunked_prefill_lose_no_blocks_and_match_unconstrained(tiny_mxfp4, llm):
    prompts = [{"prompt_token_ids": list(range(300 + 7 * i, 300 + 7 * i + 5 + 3 * i))} for i in range(6)]
    params = SamplingParams(max_tokens=10, **GREEDY)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    tight = LLM(tiny_mxfp4, num_kv_blocks=12, block_size=4, max_model_len=48, max_num_batched_tokens=6)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == want
    bm = tight.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_sequence_reaching_exactly_max_model_len(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=6, block_size=4, max_model_len=22)
    out = llm.generate({"prompt_token_ids": list(range(10, 31))}, SamplingParams(max_tokens=None, **GREEDY),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    out = llm.generate({"prompt_token_ids": list(range(10, 15))}, SamplingParams(max_tokens=None, **GREEDY),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 17 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": list(range(10, 32))}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == 6


def test_abort_mid_chunked_prefill_frees_blocks(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=32, block_size=4, max_model_len=128, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("chunky", {"prompt_token_ids": list(range(400, 440))},
                       SamplingParams(n=3, max_tokens=5, **GREEDY))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 32
    engine.abort_request("chunky")
    assert engine.block_manager.num_free_blocks == 32
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_earliest_stop_string_wins_when_one_token_completes_two(llm):
    tok = llm.get_tokenizer()
    full = llm.generate("Stop order", SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0].outputs[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i, p in enumerate(pieces) if len(p.strip()) >= 2)
    text_before = "".join(pieces[:k])
    first, second = pieces[k][0], pieces[k][-1]
    if first in text_before or second in text_before or first == second:
        pytest.skip("generated text does not give two distinct fresh characters")
    # Listed second but occurring first in the text: the text must end before it.
    out = llm.generate("Stop order", SamplingParams(max_tokens=20, stop=[second, first], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text_before and out.stop_reason == first


def test_shutdown_fails_pending_streams(tiny_mxfp4):
    from minivllm.engine.async_engine import EngineDeadError

    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=64, block_size=4,
                                                     max_model_len=128))

    async def main():
        stream = engine.generate("shut down", SamplingParams(max_tokens=100, **GREEDY))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async with asyncio.timeout(10):  # not left waiting forever for a dead engine thread
                async for _ in stream:
                    pass

    asyncio.run(main())


def test_openai_rejects_out_of_vocab_stop_token_ids_before_streaming(tiny_mxfp4):
    from minivllm.openai import OpenAIError, OpenAIServing

    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=64, block_size=4,
                                                     max_model_len=128))
    serving = OpenAIServing(engine, "tiny", max_model_len=128)

    async def main():
        for route, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/completions", {"prompt": "hi"})]:
            with pytest.raises(OpenAIError) as e:
                await serving.dispatch(route, {**body, "stream": True, "max_tokens": 3, "min_tokens": 1,
                                               "stop_token_ids": [10**7]})
            assert e.value.status_code == 400 and e.value.param == "stop_token_ids"

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_stop_string_completed_before_min_tokens_stays_ignored(llm):
    tok = llm.get_tokenizer()
    full = llm.generate("Min tokens and stops", SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A character that token 2 brings and tokens 1 and 3 do not: with min_tokens=3 it must not stop
    # generation at token 3 (it did not complete there). A long, never-matching stop string widens
    # the look-back window, which used to let the old match through.
    fresh = [ch for ch in pieces[1] if not ch.isspace() and ch not in pieces[0] + pieces[2]]
    if not fresh:
        pytest.skip("generated text does not give a suitable character")
    stop = fresh[-1]
    params = SamplingParams(max_tokens=12, min_tokens=3, stop=[stop, "\x00" * 8], **GREEDY)
    out = llm.generate("Min tokens and stops", params, use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("".join(pieces[:3]))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_draws_on_cuda_logits():
    import torch

    from minivllm.engine.sampler import Sampler

    class Seq:  # what the sampler reads of a seeded sequence
        params = SamplingParams(temperature=1.0, seed=5)
        plain_greedy = False
        generator = torch.Generator().manual_seed(5)

    logits = torch.randn(1, 1000)
    on_gpu = Sampler([0], torch.Generator("cuda").manual_seed(0))(logits.cuda(), [Seq()]).token_ids
    Seq.generator = torch.Generator().manual_seed(5)
    on_cpu = Sampler([0], torch.Generator().manual_seed(0))(logits, [Seq()]).token_ids
    assert on_cpu == on_gpu  # the seed's draws, whatever the device

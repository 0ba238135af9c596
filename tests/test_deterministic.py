"""Deterministic (batch-invariant) mode: a request's tokens and logprobs, greedy or seeded, are
bit-identical alone and inside batches of 7 and 64 mixed requests (long prompts in chunks too)."""

import random

import pytest

from conftest import finished_outputs, recorded_steps
from minivllm import SamplingParams
from minivllm.config import EngineArgs
from minivllm.engine.llm_engine import LLMEngine


def mixed_requests(count: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(1000, 100_000) for _ in range(rng.randrange(5, 150))]
        if i % 2:
            params = SamplingParams(max_tokens=rng.randrange(4, 12), temperature=0.9, top_p=0.9, seed=i,
                                    logprobs=2, ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=rng.randrange(4, 12), temperature=0.0, logprobs=1, ignore_eos=True)
        requests.append((prompt, params))
    return requests


def run(engine: LLMEngine, requests) -> dict[int, tuple[list[int], list]]:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    return {int(rid): (out.outputs[0].token_ids, out.outputs[0].logprobs)
            for rid, out in finished_outputs(engine).items()}


def engine_of(deterministic: bool) -> LLMEngine:
    return LLMEngine(EngineArgs(model=None, deterministic=deterministic, num_kv_blocks=1024, max_model_len=512,
                                max_num_batched_tokens=64, max_num_seqs=16))


def test_a_request_gives_the_same_bits_alone_and_in_batches_of_7_and_64():
    engine = engine_of(deterministic=True)
    requests = mixed_requests(64)
    alone = {}
    for i, request in enumerate(requests):
        alone[i] = run(engine, [request])[0]
    assert run(engine, requests[:7]) == {i: alone[i] for i in range(7)}
    assert run(engine, requests) == alone
    assert engine.scheduler.num_preemptions == 0  # (a recompute is the one thing that may change bits)


def test_deterministic_chunks_have_fixed_sizes_beside_running_decodes():
    engine = engine_of(deterministic=True)
    chunk = engine.scheduler.fixed_chunk
    assert chunk == 64 - 16 + 1
    for i in range(10):
        engine.add_request(f"d{i}", {"prompt_token_ids": [1000 + i, 2000 + i]}, SamplingParams(max_tokens=50))
    engine.step()  # ten running decodes
    engine.add_request("long", {"prompt_token_ids": list(range(3000, 3000 + 2 * chunk + 5))},
                       SamplingParams(max_tokens=1))
    steps = recorded_steps(engine)
    while "long" in engine.requests:
        engine.step()
    sizes = [n for step in steps for rid, n in step if rid == "long"]
    assert sizes == [chunk, chunk, 5]  # not the 54 tokens the budget left beside the decodes


def test_deterministic_mode_refuses_what_would_break_it():
    with pytest.raises(ValueError, match="speculative_config"):
        EngineArgs(deterministic=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineArgs(deterministic=True, max_num_batched_tokens=16, max_num_seqs=16)

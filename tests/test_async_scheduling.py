"""Async scheduling (overlap): step N+1 is scheduled and launched before step N's tokens are
processed, its decodes taking N's sampled ids on the device. Outputs must equal the synchronous
engine's token for token, for greedy and seeded requests, through stops, limits, preemption,
prefix hits, n > 1, logprobs, penalties and abort."""

import math

import pytest
import torch

from minivllm import LLM, EngineArgs, SamplingParams
from minivllm.engine.sequence import SequenceStatus
from minivllm.model.tiny import CYCLE, write_copy_checkpoint
from minivllm.tokenizer import Tokenizer

from conftest import finished_outputs

COMMON = dict(num_kv_blocks=40, block_size=4, max_model_len=48, max_num_batched_tokens=32, max_num_seqs=16)


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    return write_copy_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "copy"), shift=1)


def _requests(n: int, history: bool):
    """Mixed prompts (cycles the copy model follows, shared prefixes) and mixed params; with
    `history`, some read the token history (penalties, min_tokens), which makes async scheduling
    process the step in flight before launching theirs."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 199_000, (9,), generator=g).tolist()
    stop_text = [Tokenizer().decode([t]) for t in (1247, 1286)]
    prompts, params = [], []
    for i in range(n):
        cycle = CYCLE[(i % 8) * 5:(i % 8) * 5 + 5]
        noise = torch.randint(0, 199_000, (1 + i % 4,), generator=g).tolist()
        prompts.append({"prompt_token_ids": (shared if i % 3 == 0 else []) + noise + cycle * (1 + i % 2)})
        kind = i % 8
        params.append(SamplingParams(
            temperature=0.0 if kind % 2 == 0 else 0.9, seed=None if kind % 2 == 0 else 100 + i,
            max_tokens=4 + i % 11, ignore_eos=True, n=2 if kind == 3 else 1,
            stop_token_ids=[1260, 1286, 1390] if kind == 2 else None, stop=stop_text if kind == 4 else None,
            logprobs=2 if kind == 6 else None, presence_penalty=0.4 if history and kind == 5 else 0.0,
            min_tokens=2 if history and kind == 7 else 0))
    return prompts, params


def _run(model: str, async_scheduling: bool, prompts, params):
    llm = LLM(model, async_scheduling=async_scheduling, **COMMON)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    outs = finished_outputs(engine)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block came back
    got = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in outs[str(i)].outputs]
           for i in range(len(prompts))]
    logprobs = [(t, lp.logprob) for i in range(len(prompts)) for c in outs[str(i)].outputs if c.logprobs
                for e in c.logprobs for t, lp in sorted(e.items())]
    return got, logprobs, engine


@pytest.mark.parametrize("history", [False, True])
def test_outputs_equal_the_synchronous_engine(copy_model, history):
    prompts, params = _requests(40, history)
    sync, sync_logprobs, _ = _run(copy_model, False, prompts, params)
    got, logprobs, engine = _run(copy_model, True, prompts, params)
    assert engine.async_scheduling
    assert engine.num_overlapped_steps > (0 if history else 20)
    assert got == sync
    # The same tokens; values within float noise (batches differ, so sums round differently).
    assert [t for t, _ in logprobs] == [t for t, _ in sync_logprobs] and logprobs
    assert all(math.isclose(a, b, abs_tol=1e-3) for (_, a), (_, b) in zip(logprobs, sync_logprobs))
    reasons = {c[2] for out in got for c in out}
    assert reasons == {"stop", "length"} and engine.scheduler.num_preemptions > 0
    assert engine.block_manager.hash_to_block  # prefix caching stayed on


def test_the_next_step_launches_before_the_previous_one_is_processed(copy_model):
    """The order that lets the host's work overlap the device's: launch N+1, then process N."""
    llm = LLM(copy_model, async_scheduling=True, **COMMON)
    engine = llm.engine
    events, steps = [], []  # steps keeps each launched step alive, so that its index names it
    launch, finish = engine._launch, engine._finish

    def spy_launch(batch, defer=False):
        launched = launch(batch, defer)
        steps.append(launched)
        events.append(("launch", len(steps) - 1))
        return launched

    def spy_finish(launched):
        events.append(("finish", next(i for i, step in enumerate(steps) if step is launched)))
        return finish(launched)

    engine._launch, engine._finish = spy_launch, spy_finish
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": CYCLE[i * 5:i * 5 + 5]},
                           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outs = finished_outputs(engine)
    assert all(len(out.outputs[0].token_ids) == 6 for out in outs.values())
    launches = [key for kind, key in events if kind == "launch"]
    # Every step but the last is processed only after the next one was launched.
    for n, key in enumerate(launches[:-1]):
        assert events.index(("finish", key)) > events.index(("launch", launches[n + 1]))
    # A sequence at max_tokens is not launched once more: 6 tokens, 6 steps (the prefill's sample + 5 decodes).
    assert len(launches) == 6


def test_a_step_that_reads_token_history_processes_the_step_in_flight_first(copy_model):
    llm = LLM(copy_model, async_scheduling=True, **COMMON)
    engine = llm.engine
    engine.add_request("p", {"prompt_token_ids": CYCLE[:5]},
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, frequency_penalty=0.5))
    while engine.has_unfinished_requests():
        engine.step()
        seq = engine.requests["p"].seqs[0] if "p" in engine.requests else None
        assert seq is None or not seq.pending_tokens or engine._in_flight is not None
        if seq is not None and engine._in_flight is not None:
            # Its step in flight was launched with every earlier token known.
            assert len(seq.pending_tokens) == 1


def test_abort_while_a_step_is_in_flight(copy_model):
    llm = LLM(copy_model, async_scheduling=True, **COMMON)
    engine = llm.engine
    for i in range(3):
        engine.add_request(str(i), {"prompt_token_ids": CYCLE[i * 5:i * 5 + 5]},
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    seq = engine.requests["1"].seqs[0]
    assert seq.pending_tokens and engine._in_flight is not None
    aborted = engine.abort_request("1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert seq.status is SequenceStatus.FINISHED and not seq.pending_tokens and not seq.block_table
    outs = finished_outputs(engine)
    assert set(outs) == {"0", "2"} and all(len(o.outputs[0].token_ids) == 20 for o in outs.values())
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_async_scheduling_settings():
    assert not EngineArgs(device="cpu").resolved_async_scheduling()  # auto: CUDA only
    assert EngineArgs(device="cpu", async_scheduling=True).resolved_async_scheduling()
    assert EngineArgs(async_scheduling="none").async_scheduling is None
    with pytest.raises(ValueError, match="async_scheduling does not combine with speculative_config"):
        EngineArgs(async_scheduling=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="deterministic"):
        EngineArgs(async_scheduling=True, deterministic=True)


def test_a_chunk_scheduled_but_never_run_leaves_no_prefix_cache_entry(copy_model):
    """Async scheduling can drop a scheduled chunk (its request failed while the step in flight
    was processed); the blocks it registered hold no K/V, so no later prompt may match them."""
    llm = LLM(copy_model, **COMMON)
    engine = llm.engine
    request = engine.add_request("a", {"prompt_token_ids": list(range(2000, 2013))},
                                 SamplingParams(max_tokens=2))
    batch = engine.scheduler.schedule()  # registers the prompt's 3 full blocks
    assert batch and len(engine.block_manager.hash_to_block) == 3
    engine.abort_request("a")
    assert not engine.block_manager.hash_to_block and request.seqs[0].is_finished

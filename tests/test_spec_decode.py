"""Speculative decoding (n-gram prompt lookup, EAGLE-3 heads): config errors, exact greedy outputs,
the rejection sampler's distribution, seeded reproducibility, KV / prefix-cache safety."""

import math
from pathlib import Path

import pytest
import torch

from minivllm import LLM, EngineArgs, SamplingParams
from minivllm.engine.sampler import Sampler
from minivllm.engine.sequence import Request, Sequence
from minivllm.engine.spec_decode.ngram import NgramProposer
from minivllm.engine.spec_decode.rejection_sampler import verify
from minivllm.model.tiny import CYCLE, write_copy_checkpoint, write_copy_eagle3_head
from minivllm.tokenizer import Tokenizer

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
GREEDY = dict(temperature=0, ignore_eos=True)


# A random head saved by the speculators library (tests/fixtures/eagle3): its drafts are almost always rejected.
SPECULATORS_HEAD = str(Path(__file__).parent / "fixtures" / "eagle3" / "tiny-eagle3")


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    return write_copy_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "copy"), shift=1)


@pytest.fixture(scope="module")
def copy_head(copy_model, tmp_path_factory):
    """An EAGLE-3 head whose first draft is accepted whenever the copy model follows its cycle."""
    return write_copy_eagle3_head(str(tmp_path_factory.mktemp("head") / "copy-eagle3"), copy_model)


def spec_config(method: str, copy_head: str) -> dict:
    return {"ngram": NGRAM, "eagle3": {"method": "eagle3", "model": copy_head, "num_speculative_tokens": 3},
            "eagle3-speculators": {"method": "eagle3", "model": SPECULATORS_HEAD}}[method]


def prompts_for(n: int, seed: int = 0) -> list[dict]:
    """Mixed prompts: random ones, ones that already run through a cycle (odd i), ones sharing a prefix."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 199_000, (12,), generator=g).tolist()
    out = []
    for i in range(n):
        noise = torch.randint(0, 199_000, (1 + i % 5,), generator=g).tolist()
        kind = i % 4
        tokens = (noise if kind == 0 else noise + cycle_of(i) * 2 if kind == 1
                  else shared + noise if kind == 2 else shared + cycle_of(i))
        out.append({"prompt_token_ids": tokens})
    return out


def cycle_of(i: int) -> list[int]:
    return CYCLE[(i % 8) * 5:(i % 8) * 5 + 5]


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("config,message", [
    ({"method": "eagle3", "num_speculative_tokens": 3}, "method 'eagle3' needs 'model'"),
    ({"method": "eagle3", "model": "a/head", "prompt_lookup_max": 3}, "only apply to method 'ngram'"),
    ({"method": "eagle", "model": "a/head", "num_speculative_tokens": 3}, "EAGLE-1 heads"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be 'eagle3' or 'ngram'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "some/draft"}, "'model' names a draft model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key"),
    ('{"method": "ngram",', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_speculative_configs_are_one_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(speculative_config=config)


def test_speculative_config_accepts_json_text_and_vllm_defaults():
    args = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, '
                                         '"draft_tensor_parallel_size": 1}')
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 3,
                                       "prompt_lookup_max": 3, "disable_by_batch_size": 32}
    assert EngineArgs(**args.model_dump()).speculative_config == args.speculative_config  # round trip
    assert EngineArgs(speculative_config={"model": "[ngram]", "num_speculative_tokens": 2}).speculative_config[
        "prompt_lookup_min"] == 5
    assert EngineArgs().speculative_config is None


# ---- proposer ----------------------------------------------------------------------------------

def _seq(tokens: list[int], params: SamplingParams | None = None, index: int = 0) -> Sequence:
    params = params or SamplingParams(**GREEDY)
    return Sequence(Request("r", None, list(tokens), params), index, params, None)


def test_ngram_proposer_copies_what_followed_the_longest_earlier_match():
    proposer = NgramProposer(3, prompt_lookup_min=1, prompt_lookup_max=3)
    seq = _seq([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4])
    # [2, 3, 4] first occurs at 1..3, followed by 5, 9, 2.
    assert proposer.propose(seq, 3) == [5, 9, 2]
    assert proposer.propose(seq, 1) == [5]
    seq.token_ids.append(6)  # no earlier 6: nothing to propose
    assert proposer.propose(seq, 3) == []
    seq.token_ids += [8, 2]  # [8, 2] seen at 10..11 -> followed by 3, 4, 6
    assert proposer.propose(seq, 3) == [3, 4, 6]
    assert NgramProposer(3, 2, 2).propose(_seq([5, 6, 7, 5]), 3) == []  # min n-gram 2: [7, 5] is new


# ---- rejection sampler -----------------------------------------------------------------------

def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token the target gives probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("params,target", [
    (SamplingParams(temperature=1.0), lambda l: torch.softmax(l, -1)),
    (SamplingParams(temperature=0.7, top_k=5), lambda l: torch.softmax(
        (l / 0.7).masked_fill(l < l.topk(5).values[..., -1:], -math.inf), -1)),
])
def test_rejection_sampling_keeps_the_target_distribution(params, target):
    vocab, draws = 8, 6000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, vocab, generator=g) * 1.5
    p = target(logits)
    draft = int(p[0].argsort()[-2])  # a likely but not the likeliest token at position 0
    seqs = [_seq([1, 2, 3], params) for _ in range(draws)]
    for seq in seqs:
        seq.spec_token_ids = [draft]
    sampler = Sampler([vocab - 1], torch.Generator().manual_seed(0))
    runs = verify(sampler, logits.repeat(draws, 1), seqs).token_ids
    first = torch.bincount(torch.tensor([run[0] for run in runs]), minlength=vocab).float()
    accepted = [run for run in runs if len(run) == 2]
    # position 0 follows the target; the draft is accepted with probability p(draft) (3 sigma bounds)
    assert _chi_square(first, p[0]) < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    rate, expected_rate = len(accepted) / draws, float(p[0, draft])
    assert abs(rate - expected_rate) < 3 * math.sqrt(expected_rate * (1 - expected_rate) / draws)
    # the bonus token after an accepted draft follows the next row's distribution
    second = torch.bincount(torch.tensor([run[1] for run in accepted]), minlength=vocab).float()
    assert _chi_square(second, p[1]) < 24.3


def test_seeded_verification_draws_what_the_plain_sampler_draws():
    vocab = 50
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=7)
    plain = _seq([1, 2], params)
    sampler = Sampler([0], torch.Generator().manual_seed(0))
    want = []
    for row in range(4):  # without speculation: one row per step, the sequence's generator in order
        token = sampler(logits[row:row + 1], [plain]).token_ids[0]
        want.append(token)
        plain.token_ids.append(token)
    spec = _seq([1, 2], params)
    spec.spec_token_ids = want[:2] + [(want[2] + 1) % vocab]  # two right drafts, then a wrong one
    assert verify(sampler, logits, [spec]).token_ids == [want[:3]]


# ---- engine --------------------------------------------------------------------------------------

def _check_cache_invariants(engine) -> None:
    """No registered block holds a token whose K/V is not in the cache (drafts included)."""
    bs = engine.block_manager.block_size
    for seq in engine.scheduler.running:
        assert len(seq.block_hashes) * bs <= seq.num_computed_tokens < len(seq.token_ids)
        for i, h in enumerate(seq.block_hashes):
            block = engine.block_manager.blocks[seq.block_table[i]]
            assert block.hash == h and block.token_ids == tuple(seq.token_ids[i * bs:(i + 1) * bs])


def _run(llm: LLM, prompts, params, check=False):
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        if check:
            _check_cache_invariants(engine)
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in outs[str(i)].outputs]
            for i in range(len(prompts))]


@pytest.mark.parametrize("method", ["ngram", "eagle3", "eagle3-speculators"])
def test_greedy_outputs_are_token_identical_to_no_speculation(copy_model, copy_head, method):
    prompts = prompts_for(64)
    tokenizer = Tokenizer()
    params = []
    for i in range(64):
        kind = i % 8
        # Stop strings / stop tokens the copy model often emits, so they land inside accepted runs.
        stop = [tokenizer.decode([t]) for t in (1247, 1286, 1390, 1442)] if kind == 1 else None
        stop_ids = [1260, 1286, 1390, 1247, 1195, 1325] if kind == 5 else None
        params.append(SamplingParams(
            max_tokens=(3 + i % 9) if kind != 7 else None, n=2 if kind == 3 else 1, stop=stop,
            stop_token_ids=stop_ids, min_tokens=3 if kind == 5 else 0, logprobs=2 if kind == 6 else None,
            **GREEDY))
    # A small KV pool and token budget: preemption, chunked prefill and prefix hits all happen.
    common = dict(num_kv_blocks=40, block_size=4, max_model_len=32, max_num_batched_tokens=64, max_num_seqs=32)
    plain = _run(LLM(copy_model, **common), prompts, params)
    spec = LLM(copy_model, speculative_config=spec_config(method, copy_head), **common)
    cut_runs = []  # runs a stop or a limit ended early: the tokens after it must be dropped
    append_run = spec.engine._append_run

    def spying_append_run(seq, tokens, logprobs):
        before = len(seq.token_ids)
        append_run(seq, tokens, logprobs)
        if len(seq.token_ids) - before < len(tokens):
            cut_runs.append(seq.finish_reason)

    spec.engine._append_run = spying_append_run
    got = _run(spec, prompts, params, check=True)
    for i, (a, b) in enumerate(zip(plain, got)):
        assert [c[:3] for c in a] == [c[:3] for c in b], i
        for ca, cb in zip(a, b):
            if ca[3] is not None:
                assert [list(e) for e in ca[3]] == [list(e) for e in cb[3]]
                # Same tokens and ranks; values within float32 noise: the copy model's logits are ~40
                # in size and batches differ with speculation, so a step's sums round differently.
                assert all(math.isclose(e1[t].logprob, e2[t].logprob, rel_tol=1e-4, abs_tol=1e-4)
                           for e1, e2 in zip(ca[3], cb[3]) for t in e1)
    stats = spec.engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"]  # some rejected
    assert stats["num_preemptions"] > 0 and spec.engine.block_manager.hash_to_block
    assert any(b[0][2] == "stop" for b in got) and any(b[0][2] == "length" for b in got)
    if method != "eagle3-speculators":  # drafts that the target often accepts
        assert stats["spec_decode_num_accepted_tokens"] > 0
        assert 1 < stats["spec_decode_mean_acceptance_length"] <= 1 + NGRAM["num_speculative_tokens"]
        assert "stop" in cut_runs
    else:
        assert stats["spec_decode_num_drafts"] > 100
    bm = spec.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


@pytest.mark.parametrize("method", ["ngram", "eagle3"])
def test_seeded_sampling_reproduces_and_matches_no_speculation(copy_model, copy_head, method):
    prompts = prompts_for(6, seed=1)
    params = [SamplingParams(temperature=0.8, top_p=0.95 if i % 3 else 1.0, seed=100 + i, max_tokens=12,
                             ignore_eos=True, presence_penalty=0.2 if i % 2 else 0.0) for i in range(6)]
    common = dict(num_kv_blocks=128, block_size=4, max_model_len=64)
    spec = LLM(copy_model, speculative_config=spec_config(method, copy_head), **common)
    first = _run(spec, prompts, params)
    assert _run(spec, prompts, params) == first
    assert spec.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert [[c[0] for c in o] for o in _run(LLM(copy_model, **common), prompts, params)] == \
        [[c[0] for c in o] for o in first]


def test_speculation_is_off_for_large_batches_and_abort_frees_drafted_blocks(copy_model):
    llm = LLM(copy_model, num_kv_blocks=64, block_size=4, max_model_len=64,
              speculative_config={**NGRAM, "disable_by_batch_size": 2})
    engine = llm.engine
    prompts = prompts_for(10)
    params = SamplingParams(max_tokens=20, **GREEDY)
    for i in (1, 5, 9):  # cycle prompts: drafts every step once decoding
        engine.add_request(str(i), prompts[i], params)
    for _ in range(3):
        engine.step()
        assert not engine.scheduler.drafted  # 3 running > 2
    engine.abort_request("9")
    engine.step()
    assert engine.scheduler.drafted
    engine.abort_request("1")
    engine.abort_request("5")
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)

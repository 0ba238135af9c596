"""Engine behaviour: abort, seeds, stops, limits, logprobs, n>1, async interleaving, bad input."""

import asyncio

import pytest
import torch

from minivllm import LLM, AsyncEngine, EngineArgs, SamplingParams
from minivllm.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def llm(tiny_mxfp4):
    return LLM(tiny_mxfp4, num_kv_blocks=256, block_size=8, max_model_len=512)


def test_abort_100_inflight_requests_frees_every_block(tiny_mxfp4):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=512, block_size=4,
                                                     max_model_len=128, max_num_seqs=32))
    blocks = engine.engine.block_manager
    start_free = blocks.num_free_blocks

    async def main():
        params = SamplingParams(temperature=0.8, max_tokens=100, ignore_eos=True)
        streams = [engine.generate(f"request number {i} " * 3, params, request_id=f"r{i}") for i in range(100)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams[:5]))  # some are mid-decode
        assert all(not f.finished for f in firsts)
        assert blocks.num_free_blocks < start_free
        await asyncio.gather(*(engine.abort(f"r{i}") for i in range(100)))
        assert blocks.num_free_blocks == start_free
        assert not engine.engine.has_unfinished_requests()
        for s in streams[:5]:
            await s.aclose()

    asyncio.run(main())
    engine.shutdown()


def test_closing_a_stream_aborts_its_request(tiny_mxfp4):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=128, block_size=4, max_model_len=128))
    start_free = engine.engine.block_manager.num_free_blocks

    async def main():
        stream = engine.generate("hello", SamplingParams(max_tokens=100, ignore_eos=True), "x")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):  # the abort is processed by the engine thread
            if engine.engine.block_manager.num_free_blocks == start_free:
                break
            await asyncio.sleep(0.01)
        assert engine.engine.block_manager.num_free_blocks == start_free

    asyncio.run(main())
    engine.shutdown()


def test_async_requests_interleave_and_match_offline(tiny_mxfp4, llm):
    prompts = ["The quick brown fox", "jumps over", "the lazy dog " * 5, "a"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_mxfp4, num_kv_blocks=256, block_size=8, max_model_len=512))
    batch_sizes = []
    original_execute = engine.engine.runner.execute

    def spying_execute(batch, *args):
        batch_sizes.append(len(batch))
        return original_execute(batch, *args)

    engine.engine.runner.execute = spying_execute

    async def collect(i, prompt):
        tokens, text = [], ""
        async for out in engine.generate(prompt, params, request_id=str(i)):
            tokens += out.outputs[0].token_ids
            text += out.outputs[0].text
        return tokens, text

    async def main():
        return await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    engine.shutdown()
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [r[0] for r in results] == [o.outputs[0].token_ids for o in offline]
    assert [r[1] for r in results] == [o.outputs[0].text for o in offline]
    assert max(batch_sizes) > 1


def test_seeded_request_is_reproducible_alone_and_in_a_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Tell me a story", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["noise one", "Tell me a story", "noise two " * 4],
                         [others, seeded, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate("Tell me a story", seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    assert llm.generate("Tell me a story", unseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_string_across_token_boundary(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode([t]) for t in full.token_ids]
    # A stop string made of the end of token 3 and the start of token 4.
    k = 3
    while not (pieces[k].strip() and pieces[k + 1].strip()):
        k += 1
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    prefix = "".join(pieces[:k + 2])
    expected_text = full.text[:full.text.find(stop)]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == expected_text and stop not in out.text
    assert len(out.token_ids) <= k + 2 and prefix.startswith(out.text)
    kept = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                                                           include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == expected_text + stop


def test_stop_token_ids_eos_max_tokens_and_min_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate("Stop tokens", greedy, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_id = full.token_ids[4]
    out = llm.generate("Stop tokens", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    # min_tokens masks the stop token until it is reached.
    late = llm.generate("Stop tokens", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id],
                                                      min_tokens=8), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 8
    assert stop_id not in late.token_ids[:7]


def test_eos_ends_generation_unless_ignored(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=64, max_model_len=256)
    eos = 200002
    # Make <|return|> the most likely token everywhere: generation must stop at once.
    llm.engine.runner.model.lm_head.bias = torch.nn.Parameter(torch.zeros(201088), requires_grad=False)
    llm.engine.runner.model.lm_head.bias.data[eos] = 1e4
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
    out = llm.generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] * 5 and out.finish_reason == "length"


def test_logprobs(llm):
    out = llm.generate("Logprobs please", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1
        assert len(entry) == 3
        assert max(lp.logprob for lp in entry.values()) == entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_n_choices_share_the_prompt_blocks(llm):
    prompt = "shared prompt " * 10
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert out.num_cached_tokens == 0
    request = llm.engine.make_request("probe", prompt, SamplingParams(n=2))
    llm.engine.add_request("probe", request)
    llm.engine.step()
    assert request.seqs[1].num_cached_tokens > 0  # the second choice reused the first one's prompt blocks
    llm.engine.abort_request("probe")


def test_penalties_follow_vllm_semantics(llm):
    engine = llm.engine
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, min_tokens=4,
                            stop_token_ids=[9])
    seq = engine.make_request("pen", {"prompt_token_ids": [5, 5, 6]}, params).seqs[0]
    seq.token_ids += [7, 7, 8]  # three generated tokens
    logits = torch.ones(1, 201088)
    logits[0, 6] = -1.0
    engine.sampler._adjust_row(logits[0], seq)
    row = logits[0]
    assert row[5] == 0.5  # prompt token: repetition penalty only (positive logit divided)
    assert row[6] == -2.0  # negative logit multiplied
    assert row[7] == pytest.approx(0.5 - 2 * 0.5 - 0.25)  # twice in the output
    assert row[8] == pytest.approx(0.5 - 0.5 - 0.25)
    assert row[4] == 1.0
    assert row[9] == float("-inf") and row[200002] == float("-inf")  # 3 < min_tokens: stops masked


def test_top_k_top_p_min_p_restrict_the_draw(llm):
    sampler = llm.engine.sampler
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seqs = []
    for kwargs in (dict(top_k=1), dict(top_p=0.5), dict(min_p=0.7)):
        seqs.append(llm.engine.make_request("x", {"prompt_token_ids": [1]}, SamplingParams(seed=0, **kwargs)).seqs[0])
    for seq in seqs:
        drawn = {sampler._draw(logits.clone(), [seq]).item() for _ in range(50)}
        assert drawn == {0}
    wide = llm.engine.make_request("x", {"prompt_token_ids": [1]}, SamplingParams(seed=0, top_p=0.85)).seqs[0]
    assert {sampler._draw(logits.clone(), [wide]).item() for _ in range(200)} == {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(n=0), "n must"), (dict(max_tokens=0), "max_tokens"), (dict(min_p=2), "min_p"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=99), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(presence_penalty=3), "presence_penalty"),
])
def test_bad_sampling_params_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="max_model_len is 512"):
        llm.generate({"prompt_token_ids": [1] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="token id 10000000 is out of vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**7]}, use_tqdm=False)
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("dup", "a", SamplingParams())
        llm.engine.add_request("dup", "a", SamplingParams())
    llm.engine.abort_request("dup")
    with pytest.raises(Exception, match="extra"):
        LLM(None, not_an_arg=1)


def test_chat_renders_harmony_and_generates(llm):
    out = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                   SamplingParams(temperature=0, max_tokens=5), use_tqdm=False, reasoning_effort="low")[0]
    tok = llm.get_tokenizer()
    rendered = tok.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "Reasoning: low" in rendered and rendered.endswith("<|start|>assistant")
    assert 1 <= len(out.outputs[0].token_ids) <= 5


def test_priority_orders_waiting_requests(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=64, max_model_len=256, max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("low", "first in", params, priority=5)
    engine.add_request("high", "second in", params, priority=-1)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["high", "low"]


def test_prompt_logprobs_match_hf_logits(tiny_mxfp4):
    from conftest import hf_model

    prompt = [100, 2000, 30000, 4000, 500, 60, 7, 80000, 9000, 123, 456, 789]
    llm = LLM(tiny_mxfp4, num_kv_blocks=64, block_size=4, max_model_len=128, max_num_batched_tokens=5)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(tiny_mxfp4)(torch.tensor([prompt])).logits[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert len(entry) in (2, 3)


def test_delta_outputs_report_each_choice_once_finished(llm):
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", "hello there", params)
    engine.requests["delta"].seqs[1].params = SamplingParams(max_tokens=2, ignore_eos=True)  # finishes early
    seen: dict[int, list] = {0: [], 1: []}
    finishes = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                seen[c.index] += c.token_ids
                if c.finish_reason:
                    finishes.append(c.index)
    assert sorted(finishes) == [0, 1]
    assert len(seen[0]) == 6 and len(seen[1]) == 2


def test_n_choices_admitted_together_share_prompt_blocks(tiny_mxfp4):
    llm = LLM(tiny_mxfp4, num_kv_blocks=64, block_size=4, max_model_len=128)
    request = llm.engine.make_request("n3", {"prompt_token_ids": list(range(1000, 1030))}, SamplingParams(n=3))
    llm.engine.add_request("n3", request)
    llm.engine.step()  # all three choices are admitted in this one step
    assert [s.num_cached_tokens for s in request.seqs] == [0, 28, 28]
    assert request.seqs[1].block_table[:7] == request.seqs[0].block_table[:7]
    llm.engine.abort_request("n3")
    assert llm.engine.block_manager.num_free_blocks == 64


def test_greedy_fast_path_takes_the_first_maximum_like_torch():
    """The plain-greedy argmax (numpy on the CPU) picks what torch.argmax picks, ties included."""
    from minivllm.engine.sampler import greedy_tokens

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, 3] = logits[1, 700] = 50.0  # a tie: the first one wins
    logits[2] = 0.0  # all equal
    assert greedy_tokens(logits) == logits.argmax(dim=-1).tolist()
    assert greedy_tokens(logits)[1:3] == [3, 0]


def test_greedy_and_sampled_requests_mixed_in_one_step(llm):
    """A plain greedy request gives the same tokens beside requests that leave the fast path
    (logprobs, a penalty, seeded sampling) as alone."""
    prompt = {"prompt_token_ids": [200006, 1000, 2000, 3000]}
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)]
    outs = llm.generate([prompt] * 4, [plain, *others], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].outputs[0].token_ids == alone and len(outs[1].outputs[0].logprobs) == 6


def test_a_step_that_samples_nothing_scores_no_rows():
    """A step of prefill chunks that end no prompt computes logits for no row (a chunk's worth of
    vocabulary-wide logits would be gigabytes)."""
    llm = LLM(num_kv_blocks=64, max_model_len=256, max_num_batched_tokens=16)
    model = llm.engine.runner.model
    compute, rows = model.compute_logits, []

    def recording(hidden):
        rows.append(tuple(hidden.shape))
        return compute(hidden)

    model.compute_logits = recording
    llm.generate([{"prompt_token_ids": list(range(1000, 1050))}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert rows[:3] == [(0, 64)] * 3 and rows[3:] == [(1, 64)] * 2  # 16 + 16 + 16 tokens, then 2 + sample, decode

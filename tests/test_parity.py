"""Our engine against transformers' GptOssForCausalLM (fp32, eager attention) on tiny checkpoints."""

import pytest
import torch
from conftest import hf_greedy, hf_model, mixed_prompts

from minivllm import LLM, SamplingParams
from minivllm.config import GptOssConfig
from minivllm.model.gpt_oss import GptOssForCausalLM
from minivllm.model.loader import load_weights
from minivllm.ops import REFERENCE_OPS, AttentionContext

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(params=["tiny_mxfp4", "tiny_dense"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def test_prefill_logits_match_hf_with_scattered_blocks(checkpoint):
    config = GptOssConfig.from_folder(checkpoint)
    model = GptOssForCausalLM(config, torch.float32, REFERENCE_OPS, max_positions=256)
    load_weights(model, checkpoint)
    prompt = mixed_prompts(lengths=(37,))[0]
    block_size, num_blocks = 4, 16
    # Blocks deliberately out of order, so the paged gather is exercised.
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))[:10]
    slots = torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in range(len(prompt))])
    kv = torch.zeros(config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    ctx = AttentionContext(slots, [0, len(prompt)], [len(prompt)], table[None], block_size)
    ours = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt)), ctx, kv))
    with torch.no_grad():
        ref = hf_model(checkpoint)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_batched_greedy_matches_hf_generate(checkpoint):
    prompts = mixed_prompts()
    llm = LLM(checkpoint, num_kv_blocks=128, block_size=8, max_model_len=256)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    hf = hf_model(checkpoint)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)


def _shared_prefix_prompts() -> list[list[int]]:
    base = mixed_prompts(seed=3, lengths=(40,))[0]
    tails = mixed_prompts(seed=4, lengths=(3, 11, 20, 1))
    return [base + t for t in tails] + mixed_prompts(seed=5, lengths=(25, 50))


@pytest.mark.parametrize("engine_args", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=5),  # chunked prefill in tiny chunks
    dict(num_kv_blocks=24, max_model_len=80),  # so small that sequences get preempted
])
def test_same_tokens_under_caching_chunking_and_preemption(tiny_mxfp4, engine_args):
    prompts = [{"prompt_token_ids": p} for p in _shared_prefix_prompts()]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = LLM(tiny_mxfp4, block_size=4, num_kv_blocks=512, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert any(o.num_cached_tokens > 0 for o in reference.generate(prompts, params, use_tqdm=False))

    llm = LLM(tiny_mxfp4, block_size=4, **{"max_model_len": 128, "num_kv_blocks": 512, **engine_args})
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    if "num_kv_blocks" in engine_args and engine_args["num_kv_blocks"] == 24:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks

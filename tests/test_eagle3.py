"""EAGLE-3 heads: one saved by the `speculators` library loads and computes what speculators'
own modules compute (tests/fixtures/eagle3, made by its make_fixture.py); the engine's drafts, made
step by step through the paged draft K/V, equal a from-scratch pass of the head; bad heads and
configs are one clear error. Output equality with and without drafts is in test_spec_decode.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivllm import LLM, EngineArgs, SamplingParams
from minivllm.config import GptOssConfig
from minivllm.model.eagle3 import Eagle3Config, Eagle3Head
from minivllm.model.gpt_oss import GptOssForCausalLM
from minivllm.model.loader import load_eagle3_weights, load_weights
from minivllm.model.tiny import default_model_path, write_copy_checkpoint, write_copy_eagle3_head
from minivllm.ops import REFERENCE_OPS, AttentionContext

FIXTURE = Path(__file__).parent / "fixtures" / "eagle3"
HEAD = str(FIXTURE / "tiny-eagle3")  # made for the embedded tiny model (write_tiny_checkpoint seed 0)
EAGLE3 = {"method": "eagle3", "model": HEAD}


def _context(table: list[int], first: int, n: int, block_size: int) -> AttentionContext:
    positions = range(first, first + n)
    return AttentionContext(
        slot_mapping=torch.tensor([table[p // block_size] * block_size + p % block_size for p in positions]),
        query_start_loc=[0, n], context_lens=[first + n], block_tables=torch.tensor([table], dtype=torch.int32),
        block_size=block_size)


def test_a_speculators_head_computes_what_speculators_computes():
    target_path = default_model_path()
    target_config = GptOssConfig.from_folder(target_path)
    target = GptOssForCausalLM(target_config, torch.float32, REFERENCE_OPS, max_positions=64)
    load_weights(target, target_path)
    config = Eagle3Config.from_folder(HEAD, target_config)
    assert (config.aux_layer_ids, config.draft_vocab_size, config.num_speculative_tokens) == ([1, 2, 3], 256, 3)
    assert config.norm_before_fc and config.norm_before_residual and not config.norm_output
    head = Eagle3Head(config, torch.float32, REFERENCE_OPS, max_positions=64)
    load_eagle3_weights(head, HEAD, lambda: target.model.embed_tokens)
    assert head.embed_tokens is target.model.embed_tokens  # the head has none: it shares the target's
    golden = load_file(str(FIXTURE / "golden.safetensors"))

    # Paged over 4-token blocks in scattered order, as the engine's cache holds it.
    block_size, table = 4, [5, 2, 7, 0]
    kv = torch.zeros(1, 2, 8, block_size, config.num_kv_heads, config.head_dim)
    hidden = head.combine(golden["aux_hidden_states"])
    torch.testing.assert_close(hidden, golden["fc_out"], rtol=0, atol=1e-5)
    normed, fed_back = head(golden["input_ids"], hidden, golden["positions"], _context(table, 0, 12, block_size), kv)
    torch.testing.assert_close(head.lm_head(normed), golden["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fed_back, golden["hidden_out"], rtol=0, atol=1e-5)

    token = head.draft_tokens(normed[-1:])
    assert token.tolist() == golden["step_input_id"].tolist()  # the d2t offset maps draft ids to target ids
    normed, fed_back = head(token, fed_back[-1:], golden["step_position"], _context(table, 12, 1, block_size), kv)
    torch.testing.assert_close(head.lm_head(normed)[0], golden["step_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fed_back[0], golden["step_hidden_out"], rtol=0, atol=1e-5)


def test_the_eagle_modelopt_layout_loads_the_same_head(tmp_path):
    """A head as EAGLE's own code and ModelOpt write it: Llama fields at the top, `midlayer.*` weights."""
    config = json.loads((Path(HEAD) / "config.json").read_text())
    flat = {**config["transformer_layer_config"], "architectures": ["LlamaForCausalLMEagle3"],
            "draft_vocab_size": 256, "norm_before_residual": True,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 3], "norm_before_fc": True}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    tensors = load_file(str(Path(HEAD) / "model.safetensors"))
    save_file({k.replace("layers.0.", "midlayer."): v for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    target_config = GptOssConfig.from_folder(default_model_path())
    heads, embedding = [], torch.nn.Embedding(201088, 64)
    for path in (HEAD, str(tmp_path)):
        config = Eagle3Config.from_folder(path, target_config)
        head = Eagle3Head(config, torch.float32, REFERENCE_OPS, max_positions=64)
        load_eagle3_weights(head, path, lambda: embedding)
        heads.append((config, head))
    (a, head_a), (b, head_b) = heads
    assert (b.aux_layer_ids, b.num_speculative_tokens) == ([1, 2, 3], None)
    assert {**vars(a), "num_speculative_tokens": None} == vars(b)
    assert all(torch.equal(head_a.state_dict()[k], v) for k, v in head_b.state_dict().items())


def test_a_head_with_a_sliding_window_layer_attends_over_it(tmp_path):
    def sliding(config):
        config["transformer_layer_config"].update(layer_types=["sliding_attention"], sliding_window=4)

    target_config = GptOssConfig.from_folder(default_model_path())
    config = Eagle3Config.from_folder(_head_copy(tmp_path, sliding), target_config)
    head = Eagle3Head(config, torch.float32, REFERENCE_OPS, max_positions=64)
    assert config.sliding_windows == [4] and head.layers[0].self_attn.sliding_window == 4
    assert Eagle3Config.from_folder(HEAD, target_config).sliding_windows == [0]


def _reference_drafts(engine, tokens: list[int], k: int) -> list[int]:
    """The head's k drafts after `tokens`, computed from scratch: one target prefill for the aux
    states, one head pass over every position, then k - 1 single-row steps."""
    runner, head, bs = engine.runner, engine.runner.draft, engine.runner.block_size
    n = len(tokens)
    table = list(range(-(-(n + k) // bs)))
    target_kv = torch.zeros(runner.kv_cache.shape[0], 2, len(table), *runner.kv_cache.shape[3:])
    draft_kv = torch.zeros(runner.draft_kv_cache.shape[0], 2, len(table), *runner.draft_kv_cache.shape[3:])
    positions = torch.arange(n - 1)
    _, aux = runner.model(torch.tensor(tokens[:-1]), positions, _context(table, 0, n - 1, bs), target_kv,
                          runner.aux_layers)
    normed, fed_back = head(torch.tensor(tokens[1:]), head.combine(aux), positions, _context(table, 0, n - 1, bs),
                            draft_kv)
    drafts, hidden = head.draft_tokens(normed[-1:]).tolist(), fed_back[-1:]
    for j in range(1, k):
        pos = n - 2 + j
        normed, hidden = head(torch.tensor(drafts[-1:]), hidden, torch.tensor([pos]), _context(table, pos, 1, bs),
                              draft_kv)
        drafts += head.draft_tokens(normed).tolist()
    return drafts


def test_drafts_made_step_by_step_equal_a_from_scratch_pass():
    """Chunked prefill, preemption and rejected drafts' scratch K/V must leave the head's paged
    K/V as a fresh pass over the same tokens would have it."""
    llm = LLM(speculative_config=EAGLE3, num_kv_blocks=24, block_size=4, max_model_len=64,
              max_num_batched_tokens=16, enable_prefix_caching=False)
    engine = llm.engine
    assert engine.drafter.k == 3  # the head's own speculative_tokens
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        prompt = torch.randint(0, 199_000, (9 + 7 * i,), generator=g).tolist()
        engine.add_request(str(i), {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=14))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.draft_token_ids:
                expected = _reference_drafts(engine, seq.token_ids, engine.drafter.k)
                assert seq.draft_token_ids == expected[:len(seq.draft_token_ids)]
                checked += 1
    assert checked > 20 and engine.scheduler.num_preemptions > 0
    assert engine.stats()["spec_decode_num_drafts"] > 0


def test_a_head_with_its_own_embedding_uses_it(tmp_path):
    target = write_copy_checkpoint(str(tmp_path / "copy"), shift=1)
    head = write_copy_eagle3_head(str(tmp_path / "head"), target, own_embedding=True)
    llm = LLM(target, speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": 2},
              num_kv_blocks=64, max_model_len=256)
    draft = llm.engine.runner.draft
    assert draft.embed_tokens is not llm.engine.runner.model.model.embed_tokens
    assert torch.equal(draft.embed_tokens.weight, llm.engine.runner.model.model.embed_tokens.weight)
    assert llm.engine.drafter.k == 2  # the config's num_speculative_tokens wins over the head's 3


def _head_copy(tmp_path, edit_config=None, drop=None) -> str:
    path = tmp_path / "head"
    shutil.copytree(HEAD, path)
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if drop:
        tensors = load_file(str(path / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(path / "model.safetensors"))
    return str(path)


@pytest.mark.parametrize("edit,drop,message", [
    (lambda c: c["transformer_layer_config"].update(vocab_size=32000), None,
     "vocabulary has 32000 tokens, the target's 201088: this head was trained for another model"),
    (lambda c: c.update(target_hidden_size=2880), None, "hidden states of size 2880, the target's are 64"),
    (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2, 9]), None, r"within \[0, 4\]"),
    (lambda c: c["transformer_layer_config"].update(model_type="mixtral"), None, "'mixtral' is not supported"),
    (lambda c: c.update(speculators_model_type="mlp"), None, "not an EAGLE-3 head"),
    (None, "layers.0.hidden_norm.weight", "missing tensor"),
])
def test_a_bad_head_is_one_clear_error_at_start(tmp_path, edit, drop, message):
    with pytest.raises(ValueError, match=message):
        head = _head_copy(tmp_path, edit, drop)
        LLM(speculative_config={"method": "eagle3", "model": head}, num_kv_blocks=64, max_model_len=256)


def test_eagle3_config_errors(tmp_path):
    with pytest.raises(ValueError, match="does not name its own"):
        head = _head_copy(tmp_path, lambda c: c.pop("speculators_config"))
        LLM(speculative_config={"method": "eagle3", "model": head}, num_kv_blocks=64, max_model_len=256)
    args = EngineArgs(speculative_config=json.dumps({**EAGLE3, "num_speculative_tokens": 2}))
    assert args.speculative_config == {"method": "eagle3", "model": HEAD, "revision": None,
                                       "num_speculative_tokens": 2, "disable_by_batch_size": 32}

"""The per-step output fast paths keep what a consumer sees."""

from minivllm.tokenizer import IncrementalDetokenizer, Tokenizer


def test_detokenizer_text_cache_never_serves_a_skipped_special_token():
    # The text cache is shared by all streams: a stream that keeps special tokens must not fill it
    # with one that a stream skipping them would then read.
    tok = Tokenizer()
    ids = [200006, *tok.encode("hi"), 200007]
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(keep.add(i) for i in ids) == "<|start|>hi<|end|>"
    skip = IncrementalDetokenizer(tok)
    assert "".join(skip.add(i) for i in ids) == "hi" == skip.text
    keep_again = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(keep_again.add(i) for i in ids) == "<|start|>hi<|end|>"

"""Engine logprobs (one {token id: Logprob} dict per token) in the chat and completions formats."""

from __future__ import annotations

from minivllm.openai.protocol import ChatLogprob, CompletionLogprobs, TopLogprob
from minivllm.outputs import Logprob

_FLOOR = -9999.0  # -inf is not JSON


def _value(lp: float) -> float:
    return max(lp, _FLOOR)


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, Logprob]],
                  top_k: int) -> list[ChatLogprob]:
    out = []
    for token, entry in zip(token_ids, entries):
        sampled = entry[token]
        ranked = sorted((lp.rank, tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top_k)
        out.append(ChatLogprob(
            token=sampled.decoded_token or "", logprob=_value(sampled.logprob),
            bytes=list(tokenizer.token_bytes(token)),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=_value(lp.logprob),
                                     bytes=list(tokenizer.token_bytes(tid))) for _, tid, lp in ranked]))
    return out


def append_completion_logprobs(into: CompletionLogprobs, token_ids: list[int],
                               entries: list[dict[int, Logprob] | None] | None, offset: int,
                               tokenizer=None) -> int:
    """Append tokens; returns the next text offset. A None entry (the first prompt token has no
    logprob) gives nulls; `entries` None (no logprobs at all) needs the tokenizer for the text."""
    for i, token in enumerate(token_ids):
        entry = entries[i] if entries is not None and i < len(entries) else None
        if entry is None:
            text = tokenizer.decode([token], skip_special_tokens=False)
            into.token_logprobs.append(None)
            into.top_logprobs.append(None)
        else:
            text = entry[token].decoded_token or ""
            into.token_logprobs.append(_value(entry[token].logprob))
            into.top_logprobs.append({lp.decoded_token or "": _value(lp.logprob) for lp in entry.values()})
        into.tokens.append(text)
        into.text_offset.append(offset)
        offset += len(text)
    return offset


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs`` field: per prompt token None (the first) or
    {"token id": {"logprob", "rank", "decoded_token"}}."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": _value(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in entry.items()}
            for entry in entries]

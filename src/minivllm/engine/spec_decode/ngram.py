"""N-gram prompt lookup: draft the tokens that followed an earlier occurrence of the sequence's tail.

For n from prompt_lookup_max down to prompt_lookup_min, the last n tokens are looked up among the
sequence's earlier n-grams (prompt and output alike); the first n that matches proposes the tokens
that followed its earliest occurrence (vLLM's choice too: the earliest leaves the most tokens to copy).

Host cost: each sequence keeps a dict from n-gram hash to the position after its first occurrence,
extended by the few tokens appended since the last step, so a proposal costs a handful of tuple
hashes and dict lookups whatever the sequence's length. The dict is built once, when a sequence is
first drafted for (O(prompt length)). A hash collision only makes a bad draft, which verification
rejects: outputs never depend on it.
"""

from __future__ import annotations

from minivllm.engine.sequence import Sequence


class NgramIndex:
    __slots__ = ("first_after", "indexed")

    def __init__(self):
        self.first_after: dict[int, int] = {}  # hash(n-gram) -> position right after its first occurrence
        self.indexed = 0  # n-grams followed by a token at positions < indexed are in the dict


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) draft tokens to follow seq.token_ids; [] when no n-gram matches."""
        tokens = seq.token_ids
        num_tokens = len(tokens)
        index = seq.ngram_index
        if index is None:
            index = seq.ngram_index = NgramIndex()
        first_after = index.first_after
        min_n, max_n = self.min_n, self.max_n
        # Index the n-grams that end right before positions indexed .. num_tokens - 1 (each has a
        # follower); the tail itself is not indexed yet, so a lookup only finds earlier occurrences.
        for pos in range(max(index.indexed, min_n), num_tokens):
            for n in range(min_n, min(max_n, pos) + 1):
                first_after.setdefault(hash(tuple(tokens[pos - n:pos])), pos)
        index.indexed = max(index.indexed, num_tokens)
        for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
            pos = first_after.get(hash(tuple(tokens[num_tokens - n:])))
            if pos is not None:
                return tokens[pos:pos + min(self.k, max_tokens)]
        return []

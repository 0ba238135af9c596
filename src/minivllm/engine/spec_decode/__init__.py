"""Speculative decoding: drafts from an EAGLE-3 head or n-gram prompt lookup, verified by one target forward.

config.py parses the `speculative_config` engine arg, eagle3.py drafts with an EAGLE-3 head
(model/eagle3.py) right after each step, ngram.py proposes drafts from a sequence's own tokens,
rejection_sampler.py turns the k + 1 verified logits rows of a sequence into the tokens it keeps.
The scheduler attaches drafts (Sequence.spec_token_ids) to decodes; the runner runs them like a
short prefill chunk; the engine keeps only the accepted ones.
"""

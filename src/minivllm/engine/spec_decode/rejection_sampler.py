"""Verify a step's drafts: from the k + 1 logits rows of a drafted sequence, the tokens it keeps.

Row j of a sequence scores the token after its real tokens plus drafts d_0 .. d_{j-1}; it is
processed exactly as the sampler would process that position without speculation (logit bias,
min_tokens, penalties over the tokens so far drafts included, temperature, top-k/p, min-p). The
sequence keeps d_0 .. d_{a-1} and one more token, the target's choice at row a, where a is the
first row whose choice differs from its draft (a = k when all match: the bonus token).

Greedy: the choice is the argmax, so the output is token for token the one without speculation.

Sampling: the choice at row j is drawn from the target distribution p_j exactly as the sampler
draws (exponential race, the sequence's own generator when seeded, one noise row per position),
and d_j is accepted when the draw equals it. For an n-gram draft (a point mass on d_j) this is the
rejection sampler vLLM uses: d_j is accepted with probability p_j(d_j), and on rejection the token
is distributed as p_j with d_j removed and renormalized. Because positions consume the generator
in the same order and amount as without speculation, a seeded request draws the same tokens with
or without it, alone or in any batch. Rows after the first rejection draw nothing.
"""

from __future__ import annotations

import torch

from minivllm.engine.sampler import Sampler, SampleResult, all_plain_greedy, seeded_noise
from minivllm.engine.sequence import Sequence


class _Ahead:
    """A sequence as row j of its verification sees it: its first j drafts accepted."""

    __slots__ = ("params", "generator", "_seq", "_draft")

    def __init__(self, seq: Sequence, draft: list[int]):
        self.params, self.generator, self._seq, self._draft = seq.params, seq.generator, seq, draft

    @property
    def num_output_tokens(self) -> int:
        return self._seq.num_output_tokens + len(self._draft)

    @property
    def token_ids(self) -> list[int]:
        return self._seq.token_ids + self._draft

    @property
    def output_token_ids(self) -> list[int]:
        return self._seq.output_token_ids + self._draft


@torch.inference_mode()
def verify(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """logits: 1 + len(seq.spec_token_ids) rows per sequence, in order. Returns per sequence the
    list of tokens it keeps (accepted drafts + one) and their logprobs entries."""
    logits = logits.float()
    drafts = [seq.spec_token_ids for seq in seqs]
    starts, row = [], 0
    for draft in drafts:
        starts.append(row)
        row += 1 + len(draft)
    if all_plain_greedy(seqs):
        choices = logits.argmax(dim=-1).tolist()
        runs = [_accepted_run(choices, start, draft) for start, draft in zip(starts, drafts)]
        return SampleResult(runs, [[None] * len(run) for run in runs])

    views: list = []
    for seq, draft in zip(seqs, drafts):
        views.append(seq)
        views.extend(_Ahead(seq, draft[:j]) for j in range(1, len(draft) + 1))
    logits, raw_logprobs = sampler.adjusted(logits, views)

    choices = torch.empty(len(views), dtype=torch.long, device=logits.device)
    greedy_rows = [r for r, v in enumerate(views) if v.params.greedy]
    random_rows = [r for r, v in enumerate(views) if not v.params.greedy]
    if greedy_rows:
        choices[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
    seeded = []
    if random_rows:
        probs = sampler._probs(logits[random_rows], [views[r] for r in random_rows])
        noise = torch.empty_like(probs).exponential_(generator=sampler.generator)
        choices[random_rows] = (probs / noise).argmax(dim=-1)
        prob_row = {r: i for i, r in enumerate(random_rows)}  # step row -> row of probs
        seeded = [(seq, start, draft) for seq, start, draft in zip(seqs, starts, drafts)
                  if seq.generator is not None and not seq.params.greedy]
    choices = choices.tolist()
    for seq, start, draft in seeded:
        # One noise row per position, in order, stopping at the first rejection: the generator moves
        # exactly as it would without speculation.
        for j in range(len(draft) + 1):
            p = probs[prob_row[start + j]]
            choices[start + j] = token = int((p / seeded_noise(seq.generator, p.shape[0], p.device)).argmax())
            if j == len(draft) or token != draft[j]:
                break
    runs = [_accepted_run(choices, start, draft) for start, draft in zip(starts, drafts)]
    if raw_logprobs is None:
        return SampleResult(runs, [[None] * len(run) for run in runs])
    used_rows = [start + j for start, run in zip(starts, runs) for j in range(len(run))]
    flat = sampler._logprobs(raw_logprobs[used_rows], [choices[r] for r in used_rows], [views[r] for r in used_rows])
    logprobs, i = [], 0
    for run in runs:
        logprobs.append(flat[i:i + len(run)])
        i += len(run)
    return SampleResult(runs, logprobs)


def _accepted_run(choices: list[int], start: int, draft: list[int]) -> list[int]:
    """The drafts that match the target's choices, then the target's choice at the first mismatch."""
    a = 0
    while a < len(draft) and choices[start + a] == draft[a]:
        a += 1
    return draft[:a] + [choices[start + a]]

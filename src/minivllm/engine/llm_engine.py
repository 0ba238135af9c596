"""The synchronous engine: add requests, step, abort. LLM and AsyncEngine both drive this."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from minivllm.config import EngineArgs, GptOssConfig
from minivllm.distributed.workers import TensorParallelError
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.model_runner import ModelRunner
from minivllm.engine.sampler import Sampler, SampleResult
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Request, Sequence, SequenceStatus
from minivllm.engine.spec_decode.eagle3 import Eagle3Proposer
from minivllm.engine.spec_decode.ngram import NgramProposer
from minivllm.engine.spec_decode.rejection_sampler import verify
from minivllm.model.loader import resolve_model_path
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams
from minivllm.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict
PROMPT_LOGPROBS_ROWS = 128  # prompt positions scored at once: 128 x vocab fp32 logits is ~100 MB


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        self.model_path = resolve_model_path(args.model, args.revision, args.hf_token, args.download_dir)
        self.model_config = GptOssConfig.from_folder(self.model_path)
        self.max_model_len = min(args.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        torch.manual_seed(args.seed)
        self.tokenizer = Tokenizer()
        eos = self.model_config.eos_token_ids or self.tokenizer.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(args, self.model_config, self.model_path, self.max_model_len)
        # Deterministic mode: a prefix-cache hit would reuse K/V computed in other chunks, other bits.
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size,
                                          args.enable_prefix_caching and not args.deterministic)
        if self.block_manager.blocks_needed(self.max_model_len) > self.block_manager.num_blocks:
            raise ValueError(
                f"max_model_len {self.max_model_len} needs {self.block_manager.blocks_needed(self.max_model_len)} "
                f"KV blocks but the cache has {self.block_manager.num_blocks}: lower max_model_len or give the "
                "KV cache more memory")
        spec = args.speculative_config
        # An EAGLE-3 head drafts right after each step (see step); n-gram drafts when the scheduler asks.
        self.drafter = self._make_drafter(spec)
        proposer = self.drafter or (NgramProposer(spec["num_speculative_tokens"], spec["prompt_lookup_min"],
                                                  spec["prompt_lookup_max"]) if spec else None)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens, proposer,
                                   self.max_model_len, spec["disable_by_batch_size"] if spec else 0,
                                   args.background_priority, fixed_chunks=args.deterministic)
        # Speculative decoding counters (vLLM's spec_decode metrics): verified drafts, drafted tokens,
        # accepted tokens.
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.sampler = Sampler(sorted(self.eos_token_ids), torch.Generator(self.runner.device).manual_seed(args.seed))
        self.requests: dict[str, Request] = {}
        self.failed: list[tuple[str, Exception]] = []
        self.async_scheduling = args.resolved_async_scheduling()
        self._in_flight: Launched | None = None  # async scheduling: the step launched, not yet processed
        self.num_overlapped_steps = 0  # steps processed while the next one was already launched

    def _make_drafter(self, spec: dict | None) -> Eagle3Proposer | None:
        if spec is None or spec["method"] != "eagle3":
            return None
        k = spec["num_speculative_tokens"] or self.runner.draft.config.num_speculative_tokens
        if not k:
            raise ValueError(f"speculative_config: num_speculative_tokens is required: the head {spec['model']!r} "
                             "does not name its own (speculators_config.proposal_methods)")
        return Eagle3Proposer(self.runner, self.block_manager, k, self.max_model_len)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to stop at tp=1)."""
        self.runner.shutdown()

    # ---- requests -----------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                     priority: int = 0) -> Request:
        """Validate and tokenize (no engine state touched, so any thread may call it)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        # The model and the sampler index tensors with these: an out-of-range id must fail here.
        check_token_ids(token_ids, vocab, "prompt")
        check_token_ids(params.stop_token_ids, vocab, "stop_token_ids")
        check_token_ids(params.logit_bias or (), vocab, "logit_bias")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len} "
                             "(prompt + at least one generated token must fit)")
        request = Request(request_id, text, token_ids, params, priority)
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            request.seqs.append(Sequence(request, i, params, detok))
        return request

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType | Request, params: SamplingParams | None = None,
                    priority: int = 0) -> Request:
        request = prompt if isinstance(prompt, Request) else self.make_request(request_id, prompt, params, priority)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (finish_reason 'abort')."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = "abort"
        return self._make_output(request, request.is_finished)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_failed(self) -> list[tuple[str, Exception]]:
        """Requests that failed (alone) since the last call, with their errors; they are already freed."""
        failed, self.failed = self.failed, []
        return failed

    def _fail_request(self, request: Request, error: Exception) -> None:
        logger.error("request %s failed: %s: %s", request.request_id, type(error).__name__, error)
        self.abort_request(request.request_id)
        self.failed.append((request.request_id, error))

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. An error that one request causes fails that request only (see take_failed):
        a failed phase is retried one request at a time to find who caused it, and the others go on
        (a request alone in its step that fails is failed; the requests waiting are untouched).

        With async scheduling the outputs are those of the step before (see _step_async)."""
        if self.async_scheduling:
            return self._step_async()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        if self.args.deterministic:
            return self._step_each_request_alone(batch)
        launched = self._launch(batch)
        return self._finish(launched) if launched is not None else []

    def _step_async(self) -> list[RequestOutput]:
        """Schedule and launch this step, then process the step in flight while the device runs
        this one, so the host's work (scheduling, input preparation, detokenizing, stop checks,
        outputs) hides behind the device's. This step's decodes take the in-flight step's tokens on
        the device. A sequence the in-flight step finishes (a stop token) runs one wasted row here.
        A step whose sampling reads the token history (penalties, min_tokens) first processes the
        step in flight, as does a step with nothing to launch."""
        batch = self.scheduler.schedule()
        in_flight, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        if in_flight is not None and (not batch or any(_reads_history(seq) for seq, _ in batch)):
            outputs, in_flight = self._finish(in_flight), None
            batch = [(seq, n) for seq, n in batch if seq.status is SequenceStatus.RUNNING]
        if batch:
            launched = self._launch(batch, defer=True)
            if launched is not None:
                for row, seq in enumerate(launched.work.seqs):
                    if seq.status is SequenceStatus.RUNNING:  # not failed in this very launch
                        seq.pending_tokens.append((launched.result.token_ids, row))
                self._in_flight = launched
        if in_flight is not None:
            self.num_overlapped_steps += self._in_flight is not None
            outputs = self._finish(in_flight)
        return outputs

    def _launch(self, batch: list[tuple[Sequence, int]], defer: bool = False) -> "Launched | None":
        """The model forward and sampling of a step (defer: the sampled ids may stay on the device)."""
        try:
            work = self._execute(batch)
        except TensorParallelError:  # a rank died: no request can run any more
            raise
        except Exception as error:
            groups = _by_request(batch)
            if len(groups) == 1:
                self._fail_request(batch[0][0].request, error)
                return None
            work = self._execute_isolated(self._without_dependents(batch, groups))
        # Drafts this step: each sampled sequence gets 1 + len(its drafts) rows and keeps a run of tokens.
        multi = bool(self.scheduler.drafted)
        try:
            result = self._sample(work.logits, work.seqs, multi, defer)
        except Exception:
            work, result = self._sample_isolated(work, multi)
        if work.prompt_targets:
            try:
                self._record_prompt_logprobs(work.prompt_hidden, work.prompt_targets)
            except Exception as error:  # the requests that asked for prompt logprobs fail, the rest go on
                for request in {seq.request.request_id: seq.request for seq, _ in work.prompt_targets}.values():
                    self._fail_request(request, error)
        # Processing needs neither: let the next step's allocations reuse their memory.
        work.logits = work.prompt_hidden = None
        return Launched(work, result, multi)

    def _finish(self, launched: "Launched") -> list[RequestOutput]:
        """Process a launched step's tokens: append them, check stops, build the outputs, draft."""
        if self.async_scheduling:
            for seq in launched.work.seqs:
                if seq.pending_tokens:  # this step's token, the oldest pending: it becomes a real one
                    del seq.pending_tokens[0]
        outputs = self._postprocess(launched.work.seqs, launched.result, launched.multi)
        if self.drafter is not None:
            self._draft(launched.work.draft_rows)
        return outputs

    def _draft(self, rows: list) -> None:
        """The EAGLE-3 head's drafts for the next step. They only change how fast tokens come, never
        which: a failure here is logged and the next step runs without drafts."""
        scheduler = self.scheduler
        try:
            self.drafter.after_step(rows, len(scheduler.running) <= scheduler.disable_by_batch_size,
                                    spare_blocks=len(scheduler.running))
        except Exception:
            logger.exception("EAGLE-3 drafting failed; this step's sequences decode without drafts")
            for seq, _, _ in rows:
                seq.draft_token_ids = []

    def _step_each_request_alone(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Deterministic mode: each request's part of the step (forward, sampling, prompt logprobs)
        runs as if the request were alone, so no result depends on the batch: on a CPU or a GPU a
        matmul's rounding changes with its row count. An error fails its request only."""
        seqs, token_ids, logprobs = [], [], []
        for group in _by_request(batch):
            work = self._execute_isolated([group])
            work, result = self._sample_isolated(work, multi=False)
            if work.prompt_targets:
                try:
                    self._record_prompt_logprobs(work.prompt_hidden, work.prompt_targets)
                except Exception as error:
                    self._fail_request(group[0][0].request, error)
            seqs += work.seqs
            token_ids += result.token_ids
            logprobs += result.logprobs
        return self._postprocess(seqs, SampleResult(token_ids, logprobs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], multi: bool,
                defer: bool = False) -> SampleResult:
        return verify(self.sampler, logits, seqs) if multi else self.sampler(logits, seqs, defer)

    def _execute(self, batch: list[tuple[Sequence, int]]) -> "StepWork":
        """The model forward of a batch; sequences' computed-token counts move on only on success."""
        prompt_rows, prompt_targets = self._prompt_logprob_rows(batch)
        try:
            logits, prompt_hidden, aux = self.runner.execute(batch, prompt_rows)
        except BaseException:
            for seq, _ in batch:  # the step's blocks were registered for the prefix cache, never written
                self.block_manager.uncache_uncomputed(seq)
            raise
        draft_rows = [] if aux is None else _draft_rows(batch, aux)
        to_sample = []
        for seq, num_new in batch:
            # Drafts' K/V counts only once they are accepted (in _postprocess).
            seq.num_computed_tokens += num_new - len(seq.spec_token_ids)
            if seq.num_computed_tokens >= len(seq.token_ids):  # its last token ran (a pending one: beyond)
                to_sample.append(seq)
        return StepWork(to_sample, logits, prompt_hidden, prompt_targets, draft_rows)

    def _without_dependents(self, batch, groups):
        """The failed step's groups, less the sequences that treat as computed a block another
        sequence was to write in this step (a prefix-cache hit on blocks registered this step):
        run alone, they would read K/V nobody wrote. They are preempted, to be recomputed."""
        bs = self.block_manager.block_size
        writers: dict[int, set[int]] = {}  # block -> ids of the sequences that were to write it
        for seq, _ in batch:
            for block in seq.block_table[seq.num_computed_tokens // bs:]:
                writers.setdefault(block, set()).add(id(seq))
        kept = []
        for group in groups:
            dependent = [seq for seq, _ in group
                         if any(writers.get(block, {id(seq)}) - {id(seq)}
                                for block in seq.block_table[:-(-seq.num_computed_tokens // bs)])]
            for seq in dependent:
                self.scheduler.preempt(seq)
            group = [(seq, n) for seq, n in group if seq not in dependent]
            if group:
                kept.append(group)
        return kept

    def _execute_isolated(self, groups: list[list[tuple[Sequence, int]]]) -> "StepWork":
        """Run each request's part of the batch alone; fail the requests whose part fails."""
        parts = []
        for group in groups:
            try:
                parts.append(self._execute(group))
            except Exception as error:
                self._fail_request(group[0][0].request, error)
        if not parts:
            return StepWork([], torch.empty(0, 0), None, [])
        prompt_hidden = [p.prompt_hidden for p in parts if p.prompt_hidden is not None]
        return StepWork([seq for p in parts for seq in p.seqs], torch.cat([p.logits for p in parts]),
                        torch.cat(prompt_hidden) if prompt_hidden else None,
                        [t for p in parts for t in p.prompt_targets], [r for p in parts for r in p.draft_rows])

    def _sample_isolated(self, work: "StepWork", multi: bool) -> tuple["StepWork", SampleResult]:
        """Sampling failed: sample each request's rows alone and fail the requests that fail."""
        kept, token_ids, logprobs = [], [], []
        for indices, rows in _rows_by_request(work.seqs):
            seqs = [work.seqs[i] for i in indices]
            try:
                result = self._sample(work.logits[rows], seqs, multi)
            except Exception as error:
                self._fail_request(seqs[0].request, error)
                continue
            kept += seqs
            token_ids += result.token_ids
            logprobs += result.logprobs
        failed = {rid for rid, _ in self.failed}
        targets = [t for t in work.prompt_targets if t[0].request.request_id not in failed]
        keep_rows = [i for i, t in enumerate(work.prompt_targets) if t[0].request.request_id not in failed]
        prompt_hidden = work.prompt_hidden[keep_rows] if targets else None
        return (StepWork(kept, work.logits, prompt_hidden, targets, work.draft_rows),
                SampleResult(token_ids, logprobs))

    def _prompt_logprob_rows(self, batch) -> tuple[list[int], list[tuple[Sequence, int]]]:
        """Step rows whose logits score the next prompt token, for sequences that asked for them."""
        rows, targets = [], []
        offset = 0
        for seq, num_new in batch:
            plp = seq.prompt_logprobs
            if plp is not None:
                for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new):
                    # Position pos scores token pos + 1; skip what a recompute after preemption already did.
                    if pos + 1 < seq.num_prompt_tokens and pos + 1 >= len(plp):
                        rows.append(offset + pos - seq.num_computed_tokens)
                        targets.append((seq, seq.token_ids[pos + 1]))
            offset += num_new
        return rows, targets

    def _record_prompt_logprobs(self, hidden: torch.Tensor, targets: list[tuple[Sequence, int]]) -> None:
        """Logprob, rank and top-k of each target prompt token, PROMPT_LOGPROBS_ROWS rows at a time
        (a full chunk of vocabulary-wide logits would not fit in memory)."""
        for start in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
            part = targets[start:start + PROMPT_LOGPROBS_ROWS]
            # Logits and their log-sum-exp, not a full log_softmax copy: ranks compare logits alike.
            logits = self.runner.model.compute_logits(hidden[start:start + len(part)])
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            tokens = torch.tensor([token for _, token in part], device=logits.device)
            target = logits.gather(1, tokens.unsqueeze(1))
            ranks = (logits > target).sum(dim=1).add_(1).tolist()
            k = max(seq.params.prompt_logprobs for seq, _ in part)
            top = logits.topk(k, dim=-1) if k else None
            top_ids, top_values = (top.indices.tolist(), (top.values - lse).tolist()) if k else (None, None)
            for i, ((seq, token), value, rank) in enumerate(zip(part, (target - lse).squeeze(1).tolist(), ranks)):
                entry = {token: Logprob(value, rank, self._token_text(token))}
                for r in range(seq.params.prompt_logprobs):
                    tid = top_ids[i][r]
                    entry.setdefault(tid, Logprob(top_values[i][r], r + 1, self._token_text(tid)))
                seq.prompt_logprobs.append(entry)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _postprocess(self, seqs: list[Sequence], result: SampleResult, multi: bool = False) -> list[RequestOutput]:
        """multi: each sequence has a run of tokens (accepted drafts + one) instead of one token."""
        now = time.monotonic()
        touched: dict[str, Request] = {}  # the requests that have an output to give this step
        ended: set[str] = set()  # the requests with a sequence finished this step: only these can be done
        finished, final_only = SequenceStatus.FINISHED, RequestOutputKind.FINAL_ONLY
        append_text_and_check_stop = self._append_text_and_check_stop
        for seq, token, lp in zip(seqs, result.token_ids, result.logprobs):
            if seq.status is finished:  # its request failed earlier in this step
                continue
            request = seq.request
            try:
                if request.first_token_time is None:
                    request.first_token_time = now
                if multi:
                    self._append_run(seq, token, lp)
                else:
                    seq.token_ids.append(token)
                    if lp is not None:
                        self._record_logprobs(seq, token, lp)
                    append_text_and_check_stop(seq, token)
            except Exception as error:  # e.g. a detokenizer error: this request's alone
                touched.pop(request.request_id, None)
                self._fail_request(request, error)
                continue
            if seq.finish_reason is not None:
                self.scheduler.remove(seq)
                ended.add(request.request_id)
            elif seq.output_kind is final_only:  # nobody reads it before the end
                continue
            touched[request.request_id] = request
        outputs = []
        make_output = self._make_output
        for request_id, request in touched.items():
            if ended and request_id in ended and request.is_finished:
                self.requests.pop(request_id, None)
                outputs.append(make_output(request, True))
            elif request.params.output_kind is not final_only:
                outputs.append(make_output(request, False))
        return outputs

    def _append_run(self, seq: Sequence, tokens: list[int], logprobs: list) -> None:
        """Append a verified run token by token; a stop inside the run drops the tokens after it."""
        if seq.spec_token_ids:
            self.spec_num_drafts += 1
            self.spec_num_draft_tokens += len(seq.spec_token_ids)
            self.spec_num_accepted_tokens += len(tokens) - 1
        for token, lp in zip(tokens, logprobs):
            seq.token_ids.append(token)
            if lp is not None:
                self._record_logprobs(seq, token, lp)
            self._append_text_and_check_stop(seq, token)
            if seq.finish_reason is not None:
                break
        # Accepted drafts were written to the cache by this step; the last token never is.
        seq.num_computed_tokens = len(seq.token_ids) - 1

    def _record_logprobs(self, seq: Sequence, token: int, lp) -> None:
        sampled, rank, top_ids, top_values = lp
        entry = {token: Logprob(sampled, rank, self._token_text(token))}
        for r, (tid, value) in enumerate(zip(top_ids, top_values), start=1):
            entry.setdefault(tid, Logprob(value, r, self._token_text(tid)))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled

    def _append_text_and_check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        num_tokens = len(seq.token_ids)
        n_out = num_tokens - seq.num_prompt_tokens
        may_stop = n_out >= p.min_tokens
        if may_stop and (token in self.eos_token_ids or token in p.stop_token_ids):
            is_eos = token in self.eos_token_ids and not p.ignore_eos
            if is_eos or token in p.stop_token_ids:
                # A stop token's text never shows, whatever skip_special_tokens says.
                seq.finish_reason = "stop"
                seq.stop_reason = None if is_eos and token not in p.stop_token_ids else token
                return
        piece = seq.detokenizer.add(token)
        # No new text (a character still incomplete) can complete no stop string.
        if piece:
            prev_len = len(seq.text)
            seq.text += piece
            if may_stop and p.stop_strings and self._check_stop_strings(seq, prev_len):
                return
        if (p.max_tokens is not None and n_out >= p.max_tokens) or num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def _check_stop_strings(seq: Sequence, prev_len: int) -> bool:
        """Finish the sequence at a stop string that ends in the text after prev_len, if any.

        Only a match that ends in this token's text counts (vLLM's rule): one completed before
        min_tokens was reached stays ignored, and text already streamed is never cut. The earliest
        match wins, whatever the list order: one token may complete two stop strings.
        """
        p = seq.params
        found = [(idx, stop) for stop in p.stop_strings
                 if (idx := seq.text.find(stop, max(0, prev_len - len(stop) + 1))) != -1]
        if not found:
            return False
        idx, stop = min(found, key=lambda f: f[0])
        seq.text = seq.text[:idx + len(stop)] if p.include_stop_str_in_output else seq.text[:idx]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _make_output(self, request: Request, finished: bool) -> RequestOutput:
        delta = request.params.output_kind is RequestOutputKind.DELTA
        completions = []
        for seq in request.seqs:
            done = seq.finish_reason is not None
            token_ids, sent_tokens = seq.token_ids, seq.sent_token_len
            start = seq.num_prompt_tokens
            num_out = len(token_ids) - start
            # DELTA: only choices with news: new tokens, or the finish not yet reported.
            if delta and (num_out == sent_tokens and not done or seq.finish_reported):
                continue
            text, logprobs = seq.text, seq.logprobs
            visible = len(text)
            if seq.stop_buffer_length and not done:
                # Hold back text that may still turn out to be the start of a stop string.
                visible = max(seq.sent_text_len, visible - seq.stop_buffer_length)
            if delta:
                seq.finish_reported = done
                text = text[seq.sent_text_len:visible]
                start += sent_tokens
                if logprobs is not None:
                    logprobs = logprobs[sent_tokens:]
            else:
                text = text[:visible]
                if logprobs is not None:
                    # A copy: the engine keeps appending to seq.logprobs (from its own thread, under AsyncEngine).
                    logprobs = list(logprobs)
            seq.sent_text_len, seq.sent_token_len = visible, num_out
            # Positional arguments (one output per request per step: keywords would cost twice as much).
            completions.append(CompletionOutput(
                seq.index, text, token_ids[start:], None if logprobs is None else seq.cumulative_logprob,
                logprobs, seq.finish_reason, seq.stop_reason))
        metrics = {"arrival_time": request.arrival_time, "first_token_time": request.first_token_time,
                   "finished_time": time.monotonic() if finished else None}
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, finished,
                             first.prompt_logprobs, first.num_cached_tokens, metrics)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage(),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_overlapped_steps": self.num_overlapped_steps,
            "spec_decode_num_drafts": self.spec_num_drafts,
            "spec_decode_num_draft_tokens": self.spec_num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.spec_num_accepted_tokens,
            # vLLM's mean acceptance length: tokens a verified draft yields (accepted + the bonus one).
            "spec_decode_mean_acceptance_length": (1 + self.spec_num_accepted_tokens / self.spec_num_drafts
                                                   if self.spec_num_drafts else 0.0),
        }


@dataclass
class Launched:
    """A step whose model forward and sampling ran (or, on a GPU, were queued) and whose tokens
    are not processed yet."""

    work: "StepWork"
    result: SampleResult
    multi: bool


def _draft_rows(batch: list[tuple[Sequence, int]], aux: torch.Tensor) -> list[tuple[Sequence, int, torch.Tensor]]:
    """Per sequence of a step about to be counted as computed: (it, its first position, the aux
    hidden states of its rows), what an EAGLE-3 head catches up on after the step."""
    rows, row = [], 0
    for seq, num_new in batch:
        rows.append((seq, seq.num_computed_tokens, aux[row:row + num_new]))
        row += num_new
    return rows


def _reads_history(seq: Sequence) -> bool:
    """Whether sampling this sequence reads its token history (async scheduling must process the
    step in flight first): repetition / presence / frequency penalties, and min_tokens not yet met."""
    p = seq.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or p.min_tokens > seq.num_output_tokens)


@dataclass
class StepWork:
    """A step's model output: the sequences to sample and their logits rows; the hidden states of
    the rows whose prompt logprobs were asked for, and (sequence, scored token) per such row; with
    an EAGLE-3 head, per sequence run (sequence, its first position, its rows' aux hidden states)."""

    seqs: list[Sequence]
    logits: torch.Tensor
    prompt_hidden: torch.Tensor | None
    prompt_targets: list[tuple[Sequence, int]]
    draft_rows: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


def check_token_ids(token_ids, vocab_size: int, what: str) -> None:
    """Raise ValueError naming the first id outside the vocabulary (vLLM's wording)."""
    for t in token_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"{what}: token id {t} is out of vocabulary (valid ids are 0 to {vocab_size - 1})")


def _by_request(batch: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    groups: dict[str, list[tuple[Sequence, int]]] = {}
    for item in batch:
        groups.setdefault(item[0].request.request_id, []).append(item)
    return list(groups.values())


def _rows_by_request(seqs: list[Sequence]) -> list[tuple[list[int], list[int]]]:
    """Per request: (indices of its sequences, its logits rows: 1 + number of drafts per sequence)."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    row = 0
    for i, seq in enumerate(seqs):
        indices, rows = groups.setdefault(seq.request.request_id, ([], []))
        indices.append(i)
        rows.extend(range(row, row + 1 + len(seq.spec_token_ids)))
        row = rows[-1] + 1
    return list(groups.values())

"""Owns the model and the KV cache; turns a scheduled batch into logits.

The KV cache is one tensor (layers, 2, blocks, block_size, kv_heads, head_dim): per layer and
for K and V, a (blocks, block_size, kv_heads, head_dim) page pool, the layout FA3's paged KV
(`page_table`) and our own paged kernels read.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from minivllm.config import EngineArgs, GptOssConfig
from minivllm.distributed.driver import TensorParallelDriver
from minivllm.distributed.parallel_state import min_over_ranks
from minivllm.distributed.workers import Workers
from minivllm.engine.cuda_graphs import DecodeGraphs, uncapturable_ops
from minivllm.engine.sampler import SampledTokens
from minivllm.engine.sequence import Sequence
from minivllm.model.eagle3 import Eagle3Config, Eagle3Head
from minivllm.model.gpt_oss import GptOssForCausalLM
from minivllm.model.loader import load_eagle3_weights, load_tensor, load_weights, resolve_model_path
from minivllm.ops import AttentionContext, get_ops

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, args: EngineArgs, config: GptOssConfig, model_path: str, max_model_len: int,
                 rank: int = 0):
        # Tensor parallelism: rank 0 (this engine) starts ranks 1.. first; each builds a ModelRunner
        # of its own (rank > 0) holding its shard of the weights and of the KV heads.
        tp = args.tensor_parallel_size
        self.workers = Workers(args, config, model_path, max_model_len) if tp > 1 and rank == 0 else None
        self.device = args.resolved_device()
        self.dtype = args.resolved_dtype()
        self.block_size = args.block_size
        self.ops = get_ops(args.ops_backend, self.device.type)
        with torch.device(self.device):
            self.model = GptOssForCausalLM(config, self.dtype, self.ops, max_positions=max_model_len)
        load_weights(self.model, model_path)
        # Under tp the head runs unsharded on rank 0 (rank 0's residual stream is the whole one).
        self.draft = self._load_draft(args, config, model_path, max_model_len) if rank == 0 else None
        self.aux_layers = tuple(self.draft.config.aux_layer_ids) if self.draft is not None else ()
        self.num_blocks = min_over_ranks(self._num_kv_blocks(args, config), self.device)
        self.kv_cache = torch.zeros(config.num_hidden_layers, 2, self.num_blocks, self.block_size,
                                    config.num_key_value_heads // tp, config.head_dim, dtype=self.dtype,
                                    device=self.device)
        # The draft head's K/V: its own tensor, addressed by the target's block tables (a sequence's
        # draft K/V for position p sits in the same block and slot as its target K/V for p).
        self.draft_kv_cache = None if self.draft is None else torch.zeros(
            self.draft.config.num_layers, 2, self.num_blocks, self.block_size, self.draft.config.num_kv_heads,
            self.draft.config.head_dim, dtype=self.dtype, device=self.device)
        if self.workers is not None:
            self.model = TensorParallelDriver(self.model, self.workers)
        self.graphs = self._capture_graphs(args, config, max_model_len)
        self._block_tables = HostBlockTables(args.max_num_seqs, -(-max_model_len // self.block_size))

    def _load_draft(self, args: EngineArgs, config: GptOssConfig, model_path: str,
                    max_model_len: int) -> Eagle3Head | None:
        spec = args.speculative_config
        if spec is None or spec["method"] != "eagle3":
            return None
        path = resolve_model_path(spec["model"], spec.get("revision"), args.hf_token, args.download_dir)
        draft_config = Eagle3Config.from_folder(path, config)
        with torch.device(self.device):
            head = Eagle3Head(draft_config, self.dtype, self.ops, max_positions=max_model_len)

        def target_embedding() -> torch.nn.Module:
            """For a head without its own: the target's, or under tp (which splits it by vocabulary
            across ranks) a whole copy read from the target's checkpoint."""
            if args.tensor_parallel_size == 1:
                return self.model.model.embed_tokens
            weight = load_tensor(model_path, "model.embed_tokens.weight")
            return torch.nn.Embedding.from_pretrained(weight.to(device=self.device, dtype=self.dtype))

        load_eagle3_weights(head, path, target_embedding)
        return head

    def _capture_graphs(self, args: EngineArgs, config: GptOssConfig, max_model_len: int) -> DecodeGraphs | None:
        # EAGLE-3 steps need the target's aux hidden states, which the captured graphs do not return.
        if self.device.type != "cuda" or args.enforce_eager or args.tensor_parallel_size > 1 or self.draft is not None:
            return None
        blocked = uncapturable_ops(self.ops, config)
        if blocked:
            logger.info("CUDA graphs off: ops %s cannot be captured", ", ".join(blocked))
            return None
        try:
            return DecodeGraphs(self.model, self.kv_cache, self.block_size, args.max_num_seqs, max_model_len)
        except RuntimeError as e:
            logger.warning("CUDA graphs off: capture failed (%s)", e)
            return None

    def _num_kv_blocks(self, args: EngineArgs, config: GptOssConfig) -> int:
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        kv_bytes_per_token = config.kv_bytes_per_token // args.tensor_parallel_size
        if self.draft is not None:
            kv_bytes_per_token += self.draft.config.kv_bytes_per_token
        block_bytes = kv_bytes_per_token * self.block_size * self.dtype.itemsize
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave what the other processes use, plus headroom for activations of the largest step.
            budget = free - (1 - args.gpu_memory_utilization) * total - 2 * 1024**3
        else:
            budget = args.kv_cache_space_gib * 1024**3
        num_blocks = int(budget // block_bytes)
        if num_blocks < 2:
            raise ValueError(f"no memory left for the KV cache (budget {budget / 1024**3:.2f} GiB); "
                             "raise gpu_memory_utilization / kv_cache_space_gib or use a smaller model")
        return num_blocks

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.close()

    def prepare(self, batch: list[tuple[Sequence, int]]):
        """Flatten the step's tokens; returns (input_ids, positions, ctx, (rows to sample, the same on
        the device, or None when every row is sampled)).

        Everything is gathered into two host tensors and moved in one copy each (pinned and
        asynchronous on a GPU), so preparing a step never waits on the device.
        """
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        tables: list[list[int]] = []
        pending: list[tuple[int, SampledTokens, int]] = []  # (step row, the in-flight step's tokens, its row)
        total = 0
        for seq, num_new in batch:
            start = seq.num_computed_tokens
            end = start + num_new
            table = seq.block_table
            tables.append(table)
            if num_new == 1:  # decode (or a 1-token prefill chunk): the common case, kept cheap
                token_ids = seq.token_ids
                if start < len(token_ids):
                    input_ids.append(token_ids[start])
                else:  # async scheduling: the token the step in flight samples, taken on the device below
                    tokens, row = seq.pending_tokens[start - len(token_ids)]
                    if isinstance(tokens, SampledTokens):
                        pending.append((total, tokens, row))
                        input_ids.append(0)
                    else:
                        input_ids.append(tokens[row])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                if end >= len(token_ids):  # its last token, known or pending
                    sample_rows.append(total)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend([table[pos // bs] * bs + pos % bs for pos in range(start, end)])
                if seq.spec_token_ids:
                    # A decode with drafts runs like a prefill chunk (its last token, then the
                    # drafts), and every row is sampled: row j verifies draft j.
                    input_ids.extend(seq.spec_token_ids)
                    sample_rows.extend(range(total, total + num_new))
                elif end == len(seq.token_ids):  # a prefill chunk that ends the prompt
                    sample_rows.append(total + num_new - 1)
            total += num_new
            query_start_loc.append(total)
            context_lens.append(end)
        # numpy turns a list of ints into an array several times faster than torch.tensor does. The
        # rows of pending input ids and their rows in the sampled ids ride along (one copy).
        rows = [r for r, _, _ in pending] + [r for _, _, r in pending]
        # The sample rows too when they are not all the rows (indexing a device tensor with a list
        # would copy the list and wait for the device).
        gather = len(sample_rows) != total
        token_data = torch.from_numpy(np.array(input_ids + positions + slots + rows + (sample_rows if gather else []),
                                               dtype=np.int64))
        block_tables = self._block_tables.build(tables)
        if self.device.type == "cuda":
            token_data = token_data.pin_memory().to(self.device, non_blocking=True)
            block_tables = block_tables.pin_memory().to(self.device, non_blocking=True)
        if pending:
            source = pending[0][1]
            assert all(tokens is source for _, tokens, _ in pending), "pending tokens come from the one step in flight"
            n = len(pending)
            step_rows, sampled_rows = token_data[3 * total:3 * total + n], token_data[3 * total + n:3 * total + 2 * n]
            token_data[:total][step_rows] = source.device_tokens[sampled_rows]
        ctx = self._context(token_data[2 * total:3 * total], query_start_loc, context_lens, block_tables)
        sample_rows_t = token_data[3 * total + 2 * len(pending):] if gather else None
        return token_data[:total], token_data[total:2 * total], ctx, (sample_rows, sample_rows_t)

    def _context(self, slot_mapping: torch.Tensor, query_start_loc: list[int], context_lens: list[int],
                 block_tables: torch.Tensor) -> AttentionContext:
        """The step's AttentionContext. On a GPU its length tensors go over now, pinned and without
        waiting: the kernels building them later from the lists would wait for the device."""
        ctx = AttentionContext(slot_mapping=slot_mapping, query_start_loc=query_start_loc, context_lens=context_lens,
                               block_tables=block_tables, block_size=self.block_size)
        if self.device.type == "cuda":
            lens = torch.from_numpy(np.array(query_start_loc + context_lens, dtype=np.int32))
            lens = lens.pin_memory().to(self.device, non_blocking=True)
            ctx.query_start_loc_t, ctx.context_lens_t = lens[:len(query_start_loc)], lens[len(query_start_loc):]
        return ctx

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], prompt_rows: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits (float32) of the last token of each sequence that finishes its prompt/step,
        hidden states of `prompt_rows` (step token indices whose prompt logprobs were asked for),
        the EAGLE-3 head's aux hidden states of every step row, or None without a head).

        Prompt rows come back as hidden states, not logits: a chunk's worth of full-vocabulary
        logits is gigabytes, so the engine turns them into logprobs a slice at a time."""
        input_ids, positions, ctx, (sample_rows, sample_rows_t) = self.prepare(batch)
        aux = None
        if self.graphs is not None and self.graphs.can_run(len(input_ids), ctx):
            hidden = self.graphs.run(input_ids, positions, ctx)
        elif self.aux_layers:
            hidden, aux = self.model(input_ids, positions, ctx, self.kv_cache, self.aux_layers)
        else:
            hidden = self.model(input_ids, positions, ctx, self.kv_cache)
        prompt_hidden = hidden[prompt_rows] if prompt_rows else None
        if len(sample_rows) == len(hidden):
            # Every row is sampled (sample_rows is then 0..n-1, as in any all-decode step): the
            # hidden states are already in order, no gather needed.
            return self.model.compute_logits(hidden), prompt_hidden, aux
        return self.model.compute_logits(hidden[sample_rows_t]), prompt_hidden, aux

    @torch.inference_mode()
    def run_draft(self, rows: list[tuple[list[int], int, list[int]]], hidden: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One EAGLE-3 head forward. rows: per sequence (block table, first position, the tokens
        that follow positions first.. first + n - 1); hidden: (total rows, head hidden) input states.
        Returns (normed states (to score), states to feed back), one row per input row."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc, context_lens, tables = [0], [], []
        for table, first, tokens in rows:
            span = range(first, first + len(tokens))
            ids.extend(tokens)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            query_start_loc.append(len(ids))
            context_lens.append(span.stop)
            tables.append(table)
        width = max(map(len, tables))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        n = len(ids)
        token_data = torch.tensor(ids + positions + slots, dtype=torch.int64)
        if self.device.type == "cuda":  # pinned and asynchronous, as in prepare
            token_data = token_data.pin_memory().to(self.device, non_blocking=True)
            block_tables = block_tables.pin_memory().to(self.device, non_blocking=True)
        ctx = self._context(token_data[2 * n:], query_start_loc, context_lens, block_tables)
        return self.draft(token_data[:n], hidden, token_data[n:2 * n], ctx, self.draft_kv_cache)


class HostBlockTables:
    """The step's block tables, padded with 0, built in a host buffer kept across steps.

    Row i keeps the table of whatever sequence was in batch slot i last step and is rewritten
    only when that table changed. In a decode-only stretch the batch barely changes and a table
    gains a block once every block_size tokens, so most rows are reused instead of re-converting
    every block id of every sequence each step.
    """

    def __init__(self, max_rows: int, max_width: int):
        self._reset(max_rows, max_width)

    def _reset(self, max_rows: int, max_width: int) -> None:
        self.buf = np.zeros((max_rows, max_width), dtype=np.int32)
        self.rows: list[list[int]] = [[] for _ in range(max_rows)]  # what each row of buf holds

    def build(self, tables: list[list[int]]) -> torch.Tensor:
        """(len(tables), longest table) int32 tensor; a copy, so the next step may reuse buf."""
        width = max(map(len, tables))
        if len(tables) > self.buf.shape[0] or width > self.buf.shape[1]:  # not expected; be safe
            self._reset(max(len(tables), self.buf.shape[0]), max(width, self.buf.shape[1]))
        buf, rows = self.buf, self.rows
        for i, table in enumerate(tables):
            if rows[i] != table:
                old_len = len(rows[i])
                buf[i, :len(table)] = table
                if old_len > len(table):
                    buf[i, len(table):old_len] = 0
                rows[i] = list(table)
        return torch.from_numpy(buf[:len(tables), :width].copy())

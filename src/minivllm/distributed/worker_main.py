"""What ranks 1..tp-1 run: join the group, build their own ModelRunner (their shard, their KV-cache
shard), then follow rank 0's steps until told to stop or rank 0 goes away."""

from __future__ import annotations

import traceback
from multiprocessing.connection import Connection

import torch

from minivllm.config import EngineArgs, GptOssConfig
from minivllm.distributed import parallel_state
from minivllm.distributed.parallel_state import broadcast
from minivllm.ops import AttentionContext


def worker_main(rank: int, size: int, port: int, backend: str, timeout_s: float, num_threads: int,
                pipe: Connection, args: EngineArgs, config: GptOssConfig, model_path: str, max_model_len: int) -> None:
    from minivllm.engine.model_runner import ModelRunner

    torch.set_num_threads(num_threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = parallel_state.make_store(rank, size, port)
        store.add("joined", 1)
        parallel_state.init_group(rank, size, store, backend, timeout_s)
        runner = ModelRunner(args, config, model_path, max_model_len, rank=rank)
        follow_steps(runner, pipe)
    except (EOFError, ConnectionError):  # rank 0 is gone: nothing left to serve
        pass
    except BaseException as e:
        try:  # rank 0 puts this in the error it raises
            pipe.send(f"{type(e).__name__}: {e}")
        except OSError:
            pass
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        parallel_state.destroy_group()


@torch.inference_mode()
def follow_steps(runner, pipe: Connection) -> None:
    """Receive → run, mirroring the driver's calls one for one (see driver.py)."""
    model, device = runner.model, runner.device
    while True:
        header = pipe.recv()
        kind = header[0]
        if kind == "stop":
            return
        if kind == "forward":
            _, num_tokens, table_shape, query_start_loc, context_lens = header
            token_data = broadcast(torch.empty(3 * num_tokens, dtype=torch.int64, device=device))
            block_tables = broadcast(torch.empty(table_shape, dtype=torch.int32, device=device))
            ctx = AttentionContext(slot_mapping=token_data[2 * num_tokens:], query_start_loc=query_start_loc,
                                   context_lens=context_lens, block_tables=block_tables,
                                   block_size=runner.block_size)
            model(token_data[:num_tokens], token_data[num_tokens:2 * num_tokens], ctx, runner.kv_cache)
        elif kind == "logits":
            _, shape, dtype = header
            model.compute_logits(broadcast(torch.empty(shape, dtype=dtype, device=device)))
        else:
            raise ValueError(f"unknown step header {kind!r}")

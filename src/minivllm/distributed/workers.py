"""Rank 0's handle on ranks 1..tp-1: start them, send them each step, stop them, notice a death.

The engine process is rank 0. It spawns one process per other rank (one GPU each, GPU r for rank r;
CPU ranks for tests), and all join one torch.distributed group over 127.0.0.1 (NCCL on CUDA,
gloo on CPU). Each step rank 0 sends a small header (what to run, a few lists) down a pipe per
rank; the step's tensors then go by torch.distributed broadcast (see driver.py). An idle worker
waits on its pipe, which needs no timeout; a collective does have one (COLLECTIVE_TIMEOUT_S).

A rank that dies closes its pipe and sockets: the next send or collective on rank 0 fails, and
TensorParallelError names the rank, its exit code and the error it reported, if any.
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.multiprocessing as mp

from minivllm.config import EngineArgs, GptOssConfig
from minivllm.distributed import parallel_state

# A collective waits this long for a rank that is alive but stuck; a dead rank fails it at once.
COLLECTIVE_TIMEOUT_S = 600.0
JOIN_TIMEOUT_S = 10.0


class TensorParallelError(RuntimeError):
    """A rank died or the group broke: the engine cannot step any more."""


def check_tensor_parallel(args: EngineArgs, config: GptOssConfig) -> None:
    """Clear errors for a tensor_parallel_size this model or machine cannot run."""
    tp = args.tensor_parallel_size
    for what, n in (("num_key_value_heads", config.num_key_value_heads),
                    ("num_attention_heads", config.num_attention_heads)):
        if n % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the model's {what} ({n}): "
                             f"each rank holds whole attention heads")
    unit = 32 if config.quant_method == "mxfp4" else 1
    if config.intermediate_size // unit < tp:
        raise ValueError(f"tensor_parallel_size {tp} is more than the model's expert intermediate size "
                         f"({config.intermediate_size}) has {'MXFP4 blocks' if unit > 1 else 'channels'}")
    device = args.resolved_device()
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")


class Workers:
    def __init__(self, args: EngineArgs, config: GptOssConfig, model_path: str, max_model_len: int):
        from minivllm.distributed.worker_main import worker_main

        check_tensor_parallel(args, config)
        self.size = args.tensor_parallel_size
        device = args.resolved_device()
        backend = "nccl" if device.type == "cuda" else "gloo"
        ctx = mp.get_context("spawn")
        self.procs, self.pipes = [], []
        self.error: TensorParallelError | None = None
        self.joined = False
        self._stop = weakref.finalize(self, _stop, self.procs, self.pipes)
        store = parallel_state.make_store(0, self.size)
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"minivllm-tp{rank}", daemon=True, args=(
                rank, self.size, store.port, backend, COLLECTIVE_TIMEOUT_S, torch.get_num_threads(), theirs,
                args, config, model_path, max_model_len))
            proc.start()
            theirs.close()  # ours alone now: the pipe breaks when the worker exits
            self.procs.append(proc)
            self.pipes.append(ours)
        if device.type == "cuda":
            torch.cuda.set_device(0)
        try:
            self._wait_for_ranks(store)
            parallel_state.init_group(0, self.size, store, backend, COLLECTIVE_TIMEOUT_S)
            self.joined = True
        except Exception as e:
            error = self.failure(e)
            self.close()
            raise error from e

    def _wait_for_ranks(self, store) -> None:
        """Until every rank has reached the store; a rank that dies on the way fails it at once."""
        deadline = time.monotonic() + parallel_state.RENDEZVOUS_TIMEOUT_S
        while store.add("joined", 0) < self.size - 1:
            if any(not proc.is_alive() for proc in self.procs):
                raise RuntimeError("it exited before joining the group; a script that starts a tp > 1 engine "
                                   "needs the `if __name__ == \"__main__\":` guard, as ranks are spawned processes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not start within {parallel_state.RENDEZVOUS_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def send(self, header: tuple) -> None:
        """Tell every rank what to run next (before the collectives of that step)."""
        if self.error is not None:
            raise self.error
        try:
            for pipe in self.pipes:
                pipe.send(header)
        except OSError as e:
            raise self.failure(e) from e

    def failure(self, cause: BaseException) -> TensorParallelError:
        """The error to raise for a failed send or collective; every later step raises it too."""
        for proc in self.procs:
            proc.join(timeout=1.0)  # a rank that just died: let its exit code show
        dead = [(rank, proc) for rank, proc in enumerate(self.procs, start=1) if not proc.is_alive()]
        if dead:
            rank, proc = dead[0]
            reported = self._reported_error(rank) or (str(cause) if not self.joined else None)
            msg = (f"tensor-parallel rank {rank} died (exit code {proc.exitcode})"
                   + (f": {reported}" if reported else "") + "; the engine cannot continue")
        else:
            msg = f"tensor-parallel group failed: {type(cause).__name__}: {cause}"
        self.error = TensorParallelError(msg)
        return self.error

    def _reported_error(self, rank: int) -> str | None:
        pipe = self.pipes[rank - 1]
        try:
            return pipe.recv() if pipe.poll() else None
        except (EOFError, OSError):
            return None

    def close(self) -> None:
        """Stop the workers and leave the group (also run when this object is collected, e.g. after
        rank 0 failed to load its shard, and at exit)."""
        self._stop()
        self.error = self.error or TensorParallelError("the tensor-parallel workers were shut down")


def _stop(procs: list, pipes: list) -> None:
    """Ask each worker to stop; kill the ones that do not within JOIN_TIMEOUT_S (stuck in a collective)."""
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except OSError:
            pass
    for proc in procs:
        proc.join(timeout=JOIN_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for pipe in pipes:
        pipe.close()
    parallel_state.destroy_group()

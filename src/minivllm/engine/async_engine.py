"""One engine per process, stepped by a background thread; asyncio callers get per-request streams.

The model step runs off the event loop (a thread), so the server stays responsive while the
model works. Requests are validated and tokenized on the caller's side, so bad input fails the
caller at once and never reaches the engine thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator

from minivllm.config import EngineArgs
from minivllm.distributed.workers import TensorParallelError
from minivllm.engine.llm_engine import LLMEngine, PromptType
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ids = itertools.count()


class Admission:
    def __init__(self, engine: "AsyncEngine") -> None:
        self._engine = engine
        self.open = True

    def close(self) -> None:
        """The admitted request is over (or never reached the engine): stop counting it."""
        if self.open:
            self.open = False
            self._engine._num_queued -= 1


_admission: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("minivllm_admission", default=None)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._num_queued = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="minivllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs | None = None, **kwargs) -> "AsyncEngine":
        return cls(LLMEngine(args or EngineArgs(**kwargs)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Closing the iterator early (or cancelling the task reading it)
        aborts the request, and the close returns once its KV blocks are free."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or f"req-{next(_ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Tokenizing and checking a prompt is O(its length): in a thread, so a huge prompt never
        # stalls the event loop (health checks, other streams).
        request = await asyncio.to_thread(self.engine.make_request, request_id, prompt, params, priority)
        if not self.is_running:  # shut down while the prompt was tokenized: nobody would take the add
            raise EngineDeadError("the engine is not running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request))
        admission = _admission.get()
        if admission is not None and admission.open:
            admission.open = False  # counted since admitted at the edge: the count is this request's now
        else:
            self._num_queued += 1
        queued, finished = True, False
        try:
            while True:
                item = await stream.get()
                if queued:
                    queued = False
                    self._num_queued -= 1
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if queued:
                self._num_queued -= 1
            self._streams.pop(request_id, None)
            if not finished:
                # Shielded: a cancelled caller still waits for the free, so "cancelled" means "freed".
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its KV blocks are free (at once if the engine is stopped)."""
        if not self.is_running:
            return
        done = asyncio.get_running_loop().create_future()
        self._send(("abort", request_id, done))
        await done

    def admit(self, max_queued: int) -> Admission | None:
        """Admission control at the edge: None when ``max_queued`` requests are already queued, else
        an Admission that counts as queued from now on (while the prompt is still being rendered)
        until the request it leads to reaches generate(), or until closed. Call from the task that
        then makes the request (the admission travels in a context variable)."""
        if self._num_queued >= max_queued:
            return None
        self._num_queued += 1
        admission = Admission(self)
        _admission.set(admission)
        return admission

    @property
    def num_queued(self) -> int:
        """Requests submitted whose first output has not come yet (waiting, or in their prefill)."""
        return self._num_queued

    @property
    def num_streams(self) -> int:
        """Requests someone is streaming right now."""
        return len(self._streams)

    def abort_all(self) -> int:
        """Abort every request someone is streaming (shutdown); their streams end with "abort".
        Returns how many there were."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self._send(("abort", request_id, None))
        return len(request_ids)

    async def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- engine thread ------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except (KeyboardInterrupt, SystemExit, TensorParallelError):  # fatal: /health turns 503
                    raise
                except BaseException as e:  # also a Rust panic; every request failed alone too
                    logger.exception("engine step failed")
                    self.last_error = e
                    self._fail_all(e)
                    continue
                for request_id, error in self.engine.take_failed():  # one request's error: its stream only
                    self.last_error = error
                    self._deliver(request_id, RuntimeError(f"request failed: {type(error).__name__}: {error}"))
                self._deliver_step(outputs)
        except BaseException as e:  # the thread dies: /health turns 503, and nobody waits forever
            logger.exception("the engine thread died")
            self.last_error = e
            self._stopped = True
        finally:
            # Nothing will step these requests again: tell their callers rather than leave them waiting.
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError("the engine was shut down"))
            self._drain_inbox(stopped=True)

    def _drain_inbox(self, stopped: bool = False) -> None:
        """Take in adds and aborts. Once ``stopped``, nothing runs again: adds fail, aborts just
        return (no request holds blocks any more)."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                request = message[1]
                try:
                    if stopped:
                        raise EngineDeadError("the engine was shut down")
                    self.engine.add_request(request.request_id, request)
                except Exception as e:
                    self._deliver(request.request_id, e)
            else:
                _, request_id, done = message
                final = None if stopped else self.engine.abort_request(request_id)
                if final is not None:  # a caller still iterating generate() gets its last output
                    self._deliver(request_id, final)
                if done is not None:
                    _call_soon(done.get_loop(), _set_result, done)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {error}"))

    def _deliver_step(self, outputs) -> None:
        """One thread-safe hand-off per event loop per step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            _call_soon(loop, stream.put_nowait, item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that caller's event loop is closed: nobody is listening any more
        pass


def _put_all(items: list) -> None:
    for stream, item in items:
        stream.put_nowait(item)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)

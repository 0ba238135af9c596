"""The batch runner: feeds batch lines to the serving layer's dispatch() (the same AsyncEngine as
real-time traffic) at low priority, a bounded number at a time, and records each answer as it
completes.

One runner per server process. Each step it looks at the active batches in the store:
validating -> validate the input file into lines; in_progress -> claim lines up to the free
in-flight slots, and finalize once no line is open; cancelling -> abort this process's lines of
it, close the rest, finalize; expired -> likewise. Claims and batch steps are leases (see
store.py), so several replicas on one PostgreSQL database share a batch, and lines of a replica
that died are run again by another (or by itself after a restart): every line is answered once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

from minivllm.batches.files import FileStorage, write_file
from minivllm.batches.store import ACTIVE_BATCH, Store, dumps
from minivllm.batches.validation import FileInvalid, error_line, line_id, validate_lines
from minivllm.openai.base import request_priority
from minivllm.openai.errors import OpenAIError

logger = logging.getLogger(__name__)

# Real-time traffic comes in turns (a user's next message, a client's next call) with short gaps:
# refilling every in-flight slot in each gap would put a burst of prefills in front of the next request.
BUSY_COOLDOWN_S = 2.0
BATCH_PRIORITY = 10  # real-time requests use 0; from EngineArgs.background_priority (10) on, lines only use idle steps


Dispatch = Callable[[str, dict, str], Awaitable]


class BatchRunner:
    def __init__(self, store: Store, storage: FileStorage, dispatch: Dispatch, *, max_in_flight: int = 16,
                 priority: int = BATCH_PRIORITY, lease_s: float = 30.0, poll_s: float = 0.5,
                 owner: str | None = None, exclusive: bool | None = None,
                 engine_streams: Callable[[], int] | None = None, busy_in_flight: int | None = None,
                 busy_cooldown_s: float = BUSY_COOLDOWN_S) -> None:
        """dispatch: OpenAIServing.dispatch. exclusive: this process is the store's only server
        (default: an SQLite store), so lines left running by a previous run go back to pending
        at start instead of waiting for their lease to run out. engine_streams: the engine's
        count of running requests (AsyncEngine.num_streams); while some are not ours (real-time
        traffic), and for busy_cooldown_s after, new lines start only up to busy_in_flight
        (default max_in_flight // 8)."""
        self.store, self.storage, self.dispatch = store, storage, dispatch
        self.max_in_flight = max_in_flight
        self.engine_streams = engine_streams
        self.busy_in_flight = max(1, max_in_flight // 8) if busy_in_flight is None else busy_in_flight
        self._in_engine = 0  # our lines inside dispatch()
        self.busy_cooldown_s = busy_cooldown_s
        self._busy_until = 0.0  # monotonic time until which real-time traffic counts as present
        self.priority = priority
        self.lease_s, self.poll_s = lease_s, poll_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.exclusive = store.is_sqlite if exclusive is None else exclusive
        self.lines_answered = 0  # recorded by this runner (diagnostics, tests)
        self._lines: dict[asyncio.Task, str] = {}  # line task -> batch id
        self._jobs: dict[str, asyncio.Task] = {}  # batch id -> its validation / finalization
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def in_flight(self) -> int:
        return len(self._lines)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self.exclusive:
            released = await asyncio.to_thread(self.store.release)
            if released:
                logger.info("resuming batches: %d line(s) left running by the last run go again", released)
        self._tasks = [asyncio.create_task(self._run(), name="batch-runner"),
                       asyncio.create_task(self._heartbeat(), name="batch-leases")]

    async def stop(self) -> None:
        """Abort this runner's lines (nothing recorded for them) and hand their leases back."""
        tasks = self._tasks + list(self._lines) + list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        try:
            await asyncio.to_thread(self.store.release, self.owner)
        except Exception:  # the database is gone: the leases run out by themselves
            logger.exception("could not release batch leases")

    def wake(self) -> None:
        """Run a step now (a new batch, a cancel); callable from any thread or event loop."""
        if self._wake is None or self._loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    # ---- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: try again next round
                logger.exception("batch runner step failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew, self.owner, self.lease_s)
            except Exception:
                logger.exception("could not renew batch leases")

    async def step(self) -> None:
        active = await asyncio.to_thread(self.store.batches_in, ACTIVE_BATCH)
        now = time.time()
        running = []
        for batch in active:
            status, batch_id = batch["status"], batch["id"]
            if batch_id in self._jobs:
                continue
            if status == "validating":
                self._job(batch_id, self._validate(batch))
            elif status == "cancelling":
                self._abort_lines(batch_id)
                self._job(batch_id, self._finalize(batch, "cancelled"))
            elif status == "finalizing":  # a replica that died finalizing it: once its lease runs out
                self._job(batch_id, self._finalize(batch, "expired" if batch["expired_at"] else "completed"))
            elif batch["expires_at"] and now > batch["expires_at"]:
                self._abort_lines(batch_id)
                self._job(batch_id, self._expire(batch))
            else:
                running.append(batch)
        limit = self.max_in_flight
        if self.engine_streams is not None and self.engine_streams() > self._in_engine:
            self._busy_until = time.monotonic() + self.busy_cooldown_s
        if time.monotonic() < self._busy_until:  # real-time requests are running, or just were: make room
            limit = min(limit, self.busy_in_flight)
        for batch in running:
            free = limit - len(self._lines)
            claimed = await asyncio.to_thread(self.store.claim_lines, batch["id"], self.owner, free, self.lease_s)
            for row in claimed:
                task = asyncio.create_task(self._run_line(batch, row))
                self._lines[task] = batch["id"]
                task.add_done_callback(self._line_done)
            if not claimed and batch["id"] not in self._lines.values():
                counts = await asyncio.to_thread(self.store.counts, batch["id"])
                if not counts.get("pending") and not counts.get("running"):
                    self._job(batch["id"], self._finalize(batch, "completed"))

    def _job(self, batch_id: str, work) -> None:
        task = asyncio.create_task(work)
        self._jobs[batch_id] = task

        def done(t: asyncio.Task) -> None:
            self._jobs.pop(batch_id, None)
            if t.cancelled():
                return
            if t.exception() is not None:
                logger.error("batch %s: %s", batch_id, t.exception(), exc_info=t.exception())
            elif t.result():  # it moved the batch on: the next step may have lines to claim
                self.wake()

        task.add_done_callback(done)

    def _line_done(self, task: asyncio.Task) -> None:
        self._lines.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch line failed", exc_info=task.exception())
        self.wake()

    def _abort_lines(self, batch_id: str) -> None:
        for task, owner_batch in list(self._lines.items()):
            if owner_batch == batch_id:
                task.cancel()

    # ---- one line -----------------------------------------------------------------------------
    async def _run_line(self, batch: dict, row: dict) -> None:
        body = json.loads(row["body"])
        request_priority.set(self.priority)  # this task's own context
        self._in_engine += 1
        try:
            result = await self.dispatch(batch["endpoint"], body, "POST")
            status, answer = 200, result
        except OpenAIError as e:
            status, answer = e.status_code, e.to_dict()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("batch %s line %d failed", batch["id"], row["idx"])
            status, answer = 500, OpenAIError(f"Internal server error: {type(e).__name__}", 500).to_dict()
        finally:
            self._in_engine -= 1
        if status == 503 or _aborted(answer):
            # The engine is stopping (or stopped): not this line's fault. It goes again later.
            await asyncio.to_thread(self.store.release_line, batch["id"], row["idx"], self.owner)
            await asyncio.sleep(self.poll_s)
            return
        request_id = answer.get("id") if status == 200 and isinstance(answer, dict) else None
        line = {"id": line_id(), "custom_id": row["custom_id"],
                "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                             "body": answer},
                "error": None}
        state = "done" if status == 200 else "failed"
        if await asyncio.to_thread(self.store.record_line, batch["id"], row["idx"], self.owner, state, dumps(line)):
            self.lines_answered += 1

    # ---- batch steps --------------------------------------------------------------------------
    async def _validate(self, batch: dict) -> bool:
        batch_id = batch["id"]
        if not await asyncio.to_thread(self.store.take_batch, batch_id, "validating", self.owner, self.lease_s):
            return False
        try:
            total = await asyncio.to_thread(self._load_lines, batch)
        except FileInvalid as e:
            await asyncio.to_thread(self.store.reset_lines, batch_id)
            await asyncio.to_thread(self.store.update_batch, batch_id, when_status="validating", when_owner=self.owner,
                                    status="failed", failed_at=int(time.time()), owner=None, lease_until=None,
                                    errors={"object": "list", "data": [e.to_error()]})
            return True
        moved = await asyncio.to_thread(self.store.update_batch, batch_id, when_status="validating",
                                        when_owner=self.owner, status="in_progress", in_progress_at=int(time.time()),
                                        total=total, owner=None, lease_until=None)
        if moved:
            logger.info("batch %s: %d line(s) validated, in progress", batch_id, total)
        return moved

    def _load_lines(self, batch: dict) -> int:
        """Validate the input file into the lines table, in pages (bounded memory)."""
        self.store.reset_lines(batch["id"])
        row = self.store.get_file(batch["input_file_id"])
        if row is None:
            raise FileInvalid("invalid_file", f"The input file {batch['input_file_id']} no longer exists.")
        page: list[dict] = []
        total = 0
        for line in validate_lines(self.storage.lines(row), batch["endpoint"]):
            page.append(line)
            total += 1
            if len(page) == 1000:
                self.store.add_lines(batch["id"], page)
                page = []
        self.store.add_lines(batch["id"], page)
        return total

    async def _expire(self, batch: dict) -> bool:
        batch_id = batch["id"]
        now = int(time.time())
        if not await asyncio.to_thread(self.store.update_batch, batch_id, when_status="in_progress",
                                       expired_at=now):
            return False

        def result_of(custom_id):
            return error_line(custom_id, "batch_expired",
                              "This request could not be executed before the batch's completion window ended.")

        await asyncio.to_thread(self.store.close_open_lines, batch_id, "failed", result_of)
        return await self._finalize({**batch, "expired_at": now}, "expired")

    async def _finalize(self, batch: dict, final: str) -> bool:
        """Write the output and error files from the recorded lines, then the final status."""
        batch_id, status = batch["id"], batch["status"]
        now = int(time.time())
        if status == "in_progress":
            if not await asyncio.to_thread(self.store.update_batch, batch_id, when_status="in_progress",
                                           status="finalizing", finalizing_at=now, owner=self.owner,
                                           lease_until=time.time() + self.lease_s):
                return False
            status = "finalizing"
        elif not await asyncio.to_thread(self.store.take_batch, batch_id, status, self.owner, self.lease_s):
            return False
        if final == "cancelled":
            await asyncio.to_thread(self.store.close_open_lines, batch_id, "cancelled")
        output, errors, counts, totals = await asyncio.to_thread(self._write_files, batch_id)
        values = {"status": final, f"{final}_at": now, "output_file_id": output, "error_file_id": errors,
                  "total": sum(counts.values()), "completed": counts.get("done", 0),
                  "failed": counts.get("failed", 0), "owner": None, "lease_until": None,
                  "model": totals.model, "usage": totals.usage() if counts.get("done") else None}
        if not await asyncio.to_thread(self.store.update_batch, batch_id, when_status=status,
                                       when_owner=self.owner, **values):
            for file_id in (output, errors):  # someone else finished it meanwhile
                if file_id:
                    await asyncio.to_thread(self.storage.delete, file_id)
            return False
        logger.info("batch %s %s: %s", batch_id, final, counts)
        return True

    def _write_files(self, batch_id: str) -> tuple[str | None, str | None, dict, "UsageTotals"]:
        counts = self.store.counts(batch_id)
        totals = UsageTotals()
        ids = []
        for state, name in (("done", "output"), ("failed", "error")):
            if not counts.get(state):
                ids.append(None)
                continue
            lines = self.store.results(batch_id, (state,))
            if state == "done":
                lines = totals.counted(lines)
            chunks = (line.encode() + b"\n" for line in lines)
            ids.append(write_file(self.storage, chunks, f"{batch_id}_{name}.jsonl", "batch_output")["id"])
        return ids[0], ids[1], counts, totals


class UsageTotals:
    """The Batch object's `model` and `usage`: summed over the answered lines as the output file is
    written (chat / completions count prompt and completion tokens, responses input and output)."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.input = self.cached = self.output = self.reasoning = 0

    def counted(self, lines: Iterator[str]) -> Iterator[str]:
        """The output lines, unchanged, each added to the totals as it goes by."""
        for line in lines:
            self.add(line)
            yield line

    def add(self, line: str) -> None:
        body = json.loads(line).get("response", {}).get("body") or {}
        self.model = self.model or body.get("model")
        usage = body.get("usage") or {}
        self.input += usage.get("prompt_tokens", usage.get("input_tokens")) or 0
        self.output += usage.get("completion_tokens", usage.get("output_tokens")) or 0
        inputs = usage.get("prompt_tokens_details", usage.get("input_tokens_details")) or {}
        outputs = usage.get("completion_tokens_details", usage.get("output_tokens_details")) or {}
        self.cached += inputs.get("cached_tokens") or 0
        self.reasoning += outputs.get("reasoning_tokens") or 0

    def usage(self) -> dict:
        return {"input_tokens": self.input, "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.output, "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.input + self.output}


def _aborted(answer) -> bool:
    """An answer cut short by an engine abort (a server shutting down), not a real one."""
    if not isinstance(answer, dict):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in answer.get("choices") or [])

"""ModelManager: the models of a models file behind one server, loaded on demand, swapped, unloaded.

Every door (HTTP routes, RunPod jobs, batch lines) goes through dispatch() or lease(): a request
names its model (absent: the first one), holds a lease on it while it runs, and waits while its
model loads. When another model is asked for and `max_loaded_models` are already in memory, one
swap runs at a time: the least recently used model stops taking requests, its running requests
get `drain_timeout_s` to finish (then they are aborted), it is unloaded, and the wanted model is
loaded; its waiting requests then all start. Models are swapped in the order they were first
waited for, and each load serves every request waiting for it, so alternating traffic never
starves a model. Loading and unloading run in a thread: the event loop (and /health) stays free.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from minivllm.model_registry import ModelEntry, ModelsFile
from minivllm.openai.errors import OpenAIError, not_found
from minivllm.openai.protocol import ModelCard, ModelList
from minivllm.openai.response_store import ResponseStore
from minivllm.openai.serving import anthropic_error, check_route
from minivllm.openai.serving_responses import ResponsesServing

logger = logging.getLogger(__name__)

UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"
# The routes whose body names a model; the others (/models, /responses/{id}) need none loaded.
MODEL_ROUTES = frozenset({"/chat/completions", "/completions", "/responses", "/messages", "/messages/count_tokens"})


class LoadedModel:
    """One load of a model: its engine, its serving layer and the requests holding it."""

    def __init__(self, name: str, engine, serving) -> None:
        self.name, self.engine, self.serving = name, engine, serving
        self.leases = 0


class ManagedModel:
    """A registered model: its entry, its state and, while loaded, its LoadedModel."""

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.name = entry.name
        self.created = int(time.time())
        self.state = UNLOADED
        self.loaded: LoadedModel | None = None
        self.waiters: list[asyncio.Future] = []
        self.waiting_since = 0.0
        self.last_used = time.monotonic()
        self.max_model_len = entry.max_model_len
        self.quantization = _quantization_on_disk(entry.model)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, root=self.entry.model or self.name,
                         max_model_len=self.max_model_len, state=self.state, quantization=self.quantization)


class ModelManager:
    def __init__(self, models_file: ModelsFile, make_serving: Callable | None, *, limits=None) -> None:
        """make_serving(engine, served_name, response_store) -> the model's OpenAIServing."""
        from minivllm.limits import RequestLimits

        self.settings = models_file
        self.models = {entry.name: ManagedModel(entry) for entry in models_file.models}
        self.default = next(iter(self.models.values()))
        self.make_serving = make_serving
        self.limits = limits or RequestLimits()
        self.responses = ResponsesServing(None, ResponseStore())  # one store: ids outlive a swap
        self.num_loads = self.num_swaps = 0
        self.load_seconds = self.swap_seconds = self.last_swap_seconds = 0.0
        self._request_observer: Callable | None = None
        self._swap: asyncio.Task | None = None
        self._idle_watch: asyncio.Task | None = None

    @classmethod
    def serving_one(cls, engine, serving) -> "ModelManager":
        """A one-model registry around an engine loaded already (and its serving, or None)."""
        name = getattr(serving, "served_model_name", None)
        manager = cls(ModelsFile(models=[ModelEntry(served_name=name)]), None, limits=getattr(serving, "limits", None))
        if getattr(serving, "responses", None) is not None:
            manager.responses = serving.responses
        manager._set_loaded(manager.default, LoadedModel(manager.default.name, engine, serving))
        return manager

    # ---- loading at start ---------------------------------------------------------------------
    def preload(self) -> None:
        """Load the first model now, in this thread (before the server starts)."""
        start = time.monotonic()
        self._set_loaded(self.default, self._build(self.default))
        self._count_load(time.monotonic() - start)

    async def start(self) -> None:
        """Start the idle-unload watch (the server's lifespan; a worker starts it on its first job)."""
        self._watch_idle()

    def shutdown(self) -> None:
        for model in self.models.values():
            if model.loaded is not None and model.loaded.engine is not None:
                model.loaded.engine.shutdown()

    # ---- requests -----------------------------------------------------------------------------
    async def dispatch(self, route: str, body: dict | None, method: str | None = None) -> dict | AsyncIterator[dict]:
        """OpenAIServing.dispatch for every registered model: the body's `model` picks one."""
        path = check_route(route, method)
        if path == "/models":
            return self.list_models()
        if path.startswith("/models/"):
            return self.lookup(path[len("/models/"):]).card().model_dump()
        if path not in MODEL_ROUTES:
            return await self.responses.handle(path[len("/responses/"):], body, method and method.upper())
        name = body.get("model") if isinstance(body, dict) else None
        loaded = await self.acquire(name if isinstance(name, str) else None, anthropic=path.startswith("/messages"))
        try:
            result = await loaded.serving.dispatch(route, body, method)
        except BaseException:
            self.release(loaded)
            raise
        if isinstance(result, dict):
            self.release(loaded)
            return result
        return LeasedStream(result, lambda: self.release(loaded))

    @asynccontextmanager
    async def lease(self, name: str | None = None) -> AsyncIterator[LoadedModel]:
        """The model `name` (None: the first), loaded and held for the block (a native job)."""
        loaded = await self.acquire(name)
        try:
            yield loaded
        finally:
            self.release(loaded)

    def lookup(self, name: str | None, anthropic: bool = False) -> ManagedModel:
        if not name:  # absent or "": the default model, as with one model
            return self.default
        model = self.models.get(name)
        if model is None:
            served = ", ".join(f"`{n}`" for n in self.models)
            error = not_found(f"The model `{name}` does not exist. This server serves {served}.", code="model_not_found")
            raise anthropic_error(error) if anthropic else error
        return model

    async def acquire(self, name: str | None, anthropic: bool = False) -> LoadedModel:
        """Wait until the model is loaded and take a lease on it; release() gives it back."""
        model = self.lookup(name, anthropic)
        self._watch_idle()
        if model.state == LOADED:
            return self._take(model)
        waiter = asyncio.get_running_loop().create_future()
        if not model.waiters:
            model.waiting_since = time.monotonic()
        model.waiters.append(waiter)
        self._schedule()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # granted just as we were cancelled
            elif waiter in model.waiters:
                model.waiters.remove(waiter)
            raise

    def release(self, loaded: LoadedModel) -> None:
        loaded.leases -= 1
        model = self.models[loaded.name]
        model.last_used = time.monotonic()

    # ---- what the server shows ----------------------------------------------------------------
    def list_models(self) -> dict:
        return ModelList(data=[m.card() for m in self.models.values()]).model_dump()

    def loaded_models(self) -> list[LoadedModel]:
        return [m.loaded for m in self.models.values() if m.loaded is not None and m.loaded.engine is not None]

    @property
    def num_streams(self) -> int:
        return sum(m.engine.num_streams for m in self.loaded_models())

    @property
    def num_queued(self) -> int:
        """Requests waiting for a model to load, plus those queued in loaded engines."""
        waiting = sum(len(m.waiters) for m in self.models.values())
        return waiting + sum(m.engine.num_queued for m in self.loaded_models())

    @property
    def is_running(self) -> bool:
        """No loaded engine died (none loaded counts as running: a request would load one)."""
        return all(m.engine.is_running for m in self.loaded_models())

    def abort_all(self) -> int:
        return sum(m.engine.abort_all() for m in self.loaded_models())

    def admit(self, max_queued: int):
        """Admission at the edge (MAX_WAITING_REQUESTS). One model: the engine's own admission.
        Several: a check of num_queued only (the engine a request reaches counts it from there)."""
        if len(self.models) == 1 and self.default.state == LOADED:
            return self.default.loaded.engine.admit(max_queued)
        return None if self.num_queued >= max_queued else _Unreserved()

    @property
    def request_observer(self) -> Callable | None:
        return self._request_observer

    @request_observer.setter
    def request_observer(self, observer: Callable | None) -> None:
        """observer(num_prompt_tokens, model_name): set on every model's serving, loaded or not."""
        self._request_observer = observer
        for loaded in self.loaded_models():
            self._observe(loaded)

    # ---- swaps --------------------------------------------------------------------------------
    def _take(self, model: ManagedModel) -> LoadedModel:
        model.loaded.leases += 1
        model.last_used = time.monotonic()
        return model.loaded

    def _schedule(self) -> None:
        """Start the next load (or swap) if none is running: for the model waited for longest."""
        if self._swap is not None:
            return
        wanted = [m for m in self.models.values() if m.waiters and m.state == UNLOADED]
        if not wanted:
            return
        model = min(wanted, key=lambda m: m.waiting_since)
        loaded = [m for m in self.models.values() if m.state == LOADED]
        victim = min(loaded, key=lambda m: m.last_used) if len(loaded) >= self.settings.max_loaded_models else None
        self._swap = asyncio.get_running_loop().create_task(self._switch(model, victim))

    async def _switch(self, model: ManagedModel | None, victim: ManagedModel | None) -> None:
        """Unload `victim` (if any), then load `model` (if any); then start the next one."""
        start = time.monotonic()
        try:
            if victim is not None:
                await self._unload(victim, f"to load {model.name}" if model else "idle")
            if model is not None:
                await self._load(model)
                if victim is not None:
                    self.num_swaps += 1
                    self.last_swap_seconds = time.monotonic() - start
                    self.swap_seconds += self.last_swap_seconds
                    logger.info("swapped %s -> %s in %.2f s", victim.name, model.name, self.last_swap_seconds)
        except Exception:  # (a failed load is handled in _load) the next swap must still start
            logger.exception("swapping in %s failed", model.name if model else None)
        finally:
            self._swap = None
        self._schedule()  # not when cancelled: the loop is shutting down

    async def _load(self, model: ManagedModel) -> None:
        model.state = LOADING
        logger.info("loading model %s (%d request(s) waiting)", model.name, len(model.waiters))
        start = time.monotonic()
        try:
            loaded = await asyncio.to_thread(self._build, model)
        except Exception as e:  # the waiting requests fail with the reason; the next request tries again
            logger.exception("model %s failed to load", model.name)
            model.state = UNLOADED
            error = OpenAIError(f"The model `{model.name}` failed to load: {e}", 500, code="model_load_failed")
            waiters, model.waiters = model.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            return
        self._set_loaded(model, loaded)
        self._count_load(time.monotonic() - start)
        logger.info("model %s loaded in %.2f s", model.name, time.monotonic() - start)
        waiters, model.waiters = model.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(self._take(model))

    def _build(self, model: ManagedModel) -> LoadedModel:
        """Engine and serving of one model (in a thread, or at start)."""
        from minivllm.engine.async_engine import AsyncEngine

        engine = AsyncEngine.from_engine_args(model.entry.engine_args())
        try:
            serving = self.make_serving(engine, model.name, self.responses.store)
        except BaseException:
            engine.shutdown()
            raise
        return LoadedModel(model.name, engine, serving)

    def _set_loaded(self, model: ManagedModel, loaded: LoadedModel) -> None:
        model.loaded, model.state = loaded, LOADED
        inner = getattr(loaded.engine, "engine", None)  # the LLMEngine (test stand-ins have less)
        model.max_model_len = getattr(inner, "max_model_len", model.max_model_len)
        model.quantization = getattr(getattr(inner, "model_config", None), "quant_method", model.quantization)
        self._observe(loaded)
        _refreeze()

    def _count_load(self, seconds: float) -> None:
        self.num_loads += 1
        self.load_seconds += seconds

    async def _unload(self, model: ManagedModel, why: str) -> None:
        """Stop taking requests, let running ones finish (bounded), then free the engine."""
        model.state = UNLOADING
        loaded = model.loaded
        engine = loaded.engine
        logger.info("unloading model %s (%s): %d request(s) running", model.name, why, loaded.leases)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (loaded.leases > 0 or engine.num_streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if engine.num_streams:
            aborted = engine.abort_all()
            logger.warning("model %s: aborted %d request(s) still running after drain_timeout_s (%g s) "
                           "to load another model", model.name, aborted, self.settings.drain_timeout_s)
            while engine.num_streams and time.monotonic() < deadline + 5:  # their streams end with "abort"
                await asyncio.sleep(0.02)
        # Only `last` keeps the engine now: _free drops it, so the collector can take it all.
        model.loaded, loaded.engine, loaded.serving = None, None, None
        last = [engine]
        del engine
        await asyncio.to_thread(_free, last)
        model.state = UNLOADED
        logger.info("model %s unloaded", model.name)

    def _watch_idle(self) -> None:
        if self.settings.idle_unload_s is not None and self._idle_watch is None:
            self._idle_watch = asyncio.get_running_loop().create_task(self._unload_idle())

    async def _unload_idle(self) -> None:
        """Unload models nobody used for idle_unload_s (the last one too: the memory goes back)."""
        idle_s = self.settings.idle_unload_s
        while True:
            await asyncio.sleep(min(1.0, idle_s / 4))
            if self._swap is not None:
                continue
            now = time.monotonic()
            for model in self.models.values():
                # last_used moves on every acquire and release, so a lease held this long with no
                # engine request is one nobody will give back (a response never sent): not a user.
                if model.state == LOADED and not model.loaded.engine.num_streams and now - model.last_used >= idle_s:
                    self._swap = asyncio.get_running_loop().create_task(self._switch(None, model))
                    break

    def _observe(self, loaded: LoadedModel) -> None:
        if loaded.serving is not None and self._request_observer is not None:
            observer, name = self._request_observer, loaded.name
            loaded.serving.request_observer = lambda num_prompt_tokens: observer(num_prompt_tokens, name)


class LeasedStream:
    """A response stream that holds its model's lease until it ends or is closed."""

    def __init__(self, stream: AsyncIterator[dict], release: Callable[[], None]) -> None:
        self._stream, self._release = stream, release

    def __aiter__(self) -> "LeasedStream":
        return self

    async def __anext__(self) -> dict:
        try:
            return await self._stream.__anext__()
        except BaseException:  # the end, an error, a cancel: the lease goes back
            self._end()
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._end()

    def _end(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __del__(self) -> None:  # a response dropped before anyone read it (the client left first)
        self._end()


class _Unreserved:
    """An admission that reserves nothing (the engine that takes the request counts it)."""

    def close(self) -> None:
        pass


def _free(last: list) -> None:
    """Stop the engine thread and give its memory back: weights and KV go with the last reference."""
    last[0].shutdown()
    last.clear()
    frozen = gc.get_freeze_count()
    gc.unfreeze()  # frozen objects are never collected: the model's cycles may be among them
    gc.collect()
    if frozen:
        gc.freeze()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _refreeze() -> None:
    """Keep start-up's frozen GC (see startup_gc) after a load or unload, where the server froze it."""
    if gc.get_freeze_count():
        gc.freeze()


def _quantization_on_disk(source: str | None) -> str | None:
    """The checkpoint's quantization, read from a local config.json before any load."""
    path = os.path.join(source, "config.json") if source else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return quant.get("quant_method")

"""Prometheus metrics of the server, named like vLLM's with a `minivllm:` prefix.

Engine state (running/waiting requests, KV usage, preemptions) is read from each loaded engine at
scrape time, and model loads and swaps from the ModelManager; per-request numbers (tokens, TTFT,
inter-token latency, end-to-end latency) come from the serving layer, which reports every request
through `track_request`. Every series has a `model_name` label.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no `_created` twin of every counter (as vLLM does)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0)


class ServerMetrics:
    def __init__(self, models) -> None:
        """models: the ModelManager."""
        self.registry = CollectorRegistry()  # per server: tests and embedders may build several
        labels, r = ["model_name"], self.registry
        self.prompt_tokens = Counter("minivllm:prompt_tokens", "Prompt tokens of started requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter("minivllm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter("minivllm:request_success", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("minivllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("minivllm:inter_token_latency_seconds", "Time between engine outputs of a request.",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("minivllm:e2e_request_latency_seconds", "Request latency, first byte in to last out.",
                             labels, buckets=_E2E_BUCKETS, registry=r)
        self._per_model: dict[str, _ModelSeries] = {}
        r.register(_EngineCollector(models))

    def track_request(self, num_prompt_tokens: int, model_name: str) -> RequestTracker:
        series = self._per_model.get(model_name)
        if series is None:
            series = self._per_model[model_name] = _ModelSeries(self, model_name)
        return RequestTracker(series, num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelSeries:
    """One model's labelled series, looked up once per model rather than once per token."""

    def __init__(self, metrics: ServerMetrics, model_name: str) -> None:
        self.model_name = model_name
        self.prompt_tokens = metrics.prompt_tokens.labels(model_name)
        self.generation_tokens = metrics.generation_tokens.labels(model_name)
        self.request_success = metrics.request_success
        self.ttft = metrics.ttft.labels(model_name)
        self.itl = metrics.itl.labels(model_name)
        self.e2e = metrics.e2e.labels(model_name)


class RequestTracker:
    __slots__ = ("finish_reason", "last", "metrics", "num_prompt_tokens", "start")

    def __init__(self, metrics: _ModelSeries, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.start = time.monotonic()
        self.last: float | None = None
        self.finish_reason: str | None = None

    def on_output(self, out) -> None:
        now = time.monotonic()
        num_new = sum(len(c.token_ids) for c in out.outputs)
        if num_new:
            m = self.metrics
            if self.last is None:
                m.ttft.observe(now - self.start)
                m.prompt_tokens.inc(self.num_prompt_tokens)
            else:
                m.itl.observe(now - self.last)
            m.generation_tokens.inc(num_new)
            self.last = now
        if out.finished:
            self.finish_reason = out.outputs[0].finish_reason if out.outputs else None

    def on_end(self) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start)
        m.request_success.labels(m.model_name, self.finish_reason or "abort").inc()


class _EngineCollector:
    """Gauges read from the loaded engines and the ModelManager when scraped."""

    def __init__(self, models) -> None:
        self.models = models

    def collect(self):
        yield from self._model_families()
        for loaded in self.models.loaded_models():
            yield from self._engine_families(loaded.name, loaded.engine)

    def _model_families(self):
        m = self.models
        state = GaugeMetricFamily("minivllm:model_state", "1 for each model's current state "
                                  "(loaded, loading, unloading, unloaded).", labels=["model_name", "state"])
        for model in m.models.values():
            for name in ("loaded", "loading", "unloading", "unloaded"):
                state.add_metric([model.name, name], float(model.state == name))
        yield state
        for name, doc, value in (("minivllm:model_loads", "Model loads (at start, on demand, in swaps).", m.num_loads),
                                 ("minivllm:model_load_seconds", "Seconds spent loading models.", m.load_seconds),
                                 ("minivllm:model_swaps", "Swaps: a model unloaded for another one.", m.num_swaps),
                                 ("minivllm:model_swap_seconds", "Seconds spent in swaps: drain, unload and load.",
                                  m.swap_seconds)):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family
        last = GaugeMetricFamily("minivllm:model_last_swap_seconds", "Duration of the latest swap.")
        last.add_metric([], m.last_swap_seconds)
        yield last

    def _engine_families(self, model_name: str, engine):
        stats = engine.engine.stats()
        for name, doc, key in (("minivllm:num_requests_running", "Sequences in the running batch.", "num_running"),
                               ("minivllm:num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting"),
                               ("minivllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                "kv_cache_usage")):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([model_name], float(stats[key]))
            yield family
        queued = GaugeMetricFamily("minivllm:num_requests_queued",
                                   "Requests submitted whose first output has not come yet (what "
                                   "MAX_WAITING_REQUESTS limits).", labels=["model_name"])
        queued.add_metric([model_name], float(engine.num_queued))
        yield queued
        preempt = CounterMetricFamily("minivllm:num_preemptions", "Preempted sequences.", labels=["model_name"])
        preempt.add_metric([model_name], float(stats.get("num_preemptions", 0)))
        # Speculative decoding, vLLM's spec_decode names.
        for name, doc, key in (("minivllm:spec_decode_num_drafts", "Verified draft runs.", "spec_decode_num_drafts"),
                               ("minivllm:spec_decode_num_draft_tokens", "Drafted tokens.",
                                "spec_decode_num_draft_tokens"),
                               ("minivllm:spec_decode_num_accepted_tokens", "Accepted drafted tokens.",
                                "spec_decode_num_accepted_tokens")):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([model_name], float(stats.get(key, 0)))
            yield family
        yield preempt

"""The RunPod worker: job input, batching, native and OpenAI jobs, configuration.

Names are imported on first use, so reading the config (and failing fast on a bad env value)
does not wait for torch.
"""

import importlib

_EXPORTS = {
    "WorkerConfig": "minivllm.worker.config",
    "ConfigError": "minivllm.worker.config",
    "make_handler": "minivllm.worker.handler_core",
    "make_concurrency_modifier": "minivllm.worker.handler_core",
    "run_test_job": "minivllm.worker.handler_core",
    "JobInput": "minivllm.worker.job_input",
    "JobInputError": "minivllm.worker.job_input",
    "BatchSize": "minivllm.worker.job_input",
    "NativeEngine": "minivllm.worker.native_engine",
    "OpenAIEngine": "minivllm.worker.openai_engine",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minivllm.worker' has no attribute {name!r}")

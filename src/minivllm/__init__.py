"""mini-vLLM: a GPT-OSS inference engine with vLLM's API.

Names are imported on first use, so light modules (the worker's config) load without torch.
"""

import importlib

_EXPORTS = {
    "LLM": "minivllm.llm",
    "LLMEngine": "minivllm.engine.llm_engine",
    "AsyncEngine": "minivllm.engine.async_engine",
    "EngineArgs": "minivllm.config",
    "SamplingParams": "minivllm.sampling_params",
    "RequestOutputKind": "minivllm.sampling_params",
    "RequestOutput": "minivllm.outputs",
    "CompletionOutput": "minivllm.outputs",
    "Logprob": "minivllm.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")

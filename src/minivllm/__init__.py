"""mini-vLLM: a GPT-OSS inference engine with vLLM's API."""

from minivllm.config import EngineArgs
from minivllm.engine.async_engine import AsyncEngine
from minivllm.engine.llm_engine import LLMEngine
from minivllm.llm import LLM
from minivllm.outputs import CompletionOutput, Logprob, RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "LLMEngine", "AsyncEngine", "EngineArgs", "SamplingParams", "RequestOutputKind",
           "RequestOutput", "CompletionOutput", "Logprob"]

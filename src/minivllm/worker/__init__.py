"""The RunPod worker: job input, batching, native and OpenAI jobs, configuration."""

from minivllm.worker.config import ConfigError, WorkerConfig
from minivllm.worker.handler_core import make_concurrency_modifier, make_handler, run_test_job
from minivllm.worker.job_input import BatchSize, JobInput, JobInputError
from minivllm.worker.native_engine import NativeEngine
from minivllm.worker.openai_engine import OpenAIEngine

__all__ = ["WorkerConfig", "ConfigError", "make_handler", "make_concurrency_modifier", "run_test_job",
           "JobInput", "JobInputError", "BatchSize", "NativeEngine", "OpenAIEngine"]

"""Triton kernels for SM90, installed as `minivllm.kernels` (never a top-level `kernels` module:
Hugging Face's `kernels` package owns that name and transformers probes for it)."""

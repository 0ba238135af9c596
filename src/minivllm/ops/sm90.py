"""SM90 (H100/H200) ops: compiled kernels where available, the reference elsewhere.

Each kernel family lives in its own module and exposes functions with the reference's exact
signatures; a family that fails to import (no Triton, extension not built) falls back, logged.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

logger = logging.getLogger(__name__)

# op name -> (module, function) of its compiled implementation
_KERNELS = {
    "moe": ("minivllm.ops.moe_triton", "moe"),
    "attention": ("minivllm.ops.attention_sm90", "paged_attention"),
    "write_kv": ("minivllm.ops.attention_sm90", "write_kv"),
    "rms_norm": ("minivllm.ops.csrc_ops", "rms_norm"),
    "rotary": ("minivllm.ops.csrc_ops", "rotary"),
}


def build_ops(reference, strict: bool = False):
    """`strict` (ops_backend="kernels"): a kernel family that cannot load is an error, not a fallback."""
    chosen = {}
    for op, (module_name, fn_name) in _KERNELS.items():
        try:
            chosen[op] = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError, RuntimeError) as e:
            if strict:
                raise RuntimeError(f"ops_backend='kernels' but the {op} kernel cannot load: {e}") from e
            logger.warning("ops.%s: using the torch reference (%s)", op, e)
    return dataclasses.replace(reference, name="sm90", **chosen)

"""One interface for every computation the model does; backends plug in here.

The pure-torch reference (`reference.py`) is the oracle: any GPU kernel must match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from minivllm.ops import reference
from minivllm.ops.context import AttentionContext

__all__ = ["Ops", "AttentionContext", "get_ops", "REFERENCE_OPS"]


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable  # (x, weight, eps, residual=None) -> normed | (normed, residual)
    rotary: Callable  # (q, k, positions, cos_sin_cache) -> (q, k)
    write_kv: Callable  # (k, v, k_cache, v_cache, slot_mapping) -> None
    attention: Callable  # (q, k_cache, v_cache, ctx, sinks, sliding_window, scale) -> out
    moe: Callable  # (x, router_weight, router_bias, experts, top_k, swiglu_limit, swiglu_alpha) -> out


REFERENCE_OPS = Ops(
    name="reference",
    rms_norm=reference.rms_norm,
    rotary=reference.rotary,
    write_kv=reference.write_kv,
    attention=reference.paged_attention,
    moe=reference.moe,
)


def get_ops(backend: str, device_type: str) -> Ops:
    """Pick the implementation of every op.

    `reference` forces pure torch everywhere. `auto` uses, on a CUDA device, each compiled kernel
    whose module imports (Triton MoE and paged attention from `minivllm.kernels`, the csrc
    extension for the small fused ops) and the reference for the rest. `kernels` demands them all.
    """
    if backend not in ("auto", "reference", "kernels"):
        raise ValueError(f"unknown ops backend {backend!r}: expected 'auto', 'reference' or 'kernels'")
    if backend == "kernels" and device_type != "cuda":
        raise ValueError("ops_backend='kernels' needs a CUDA device")
    if backend == "reference" or device_type != "cuda":
        return REFERENCE_OPS
    from minivllm.ops import sm90

    return sm90.build_ops(REFERENCE_OPS, strict=backend == "kernels")

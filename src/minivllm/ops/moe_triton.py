"""Triton MXFP4 mixture of experts (SM90), with the reference's exact signature.

One MoE call is three launches at decode (M <= 64): routing + top-k + sort, the gate_up GEMM with
bias and SwiGLU fused, the down GEMM with bias, routing weight and the sum over experts fused. Prefill
adds a sort pass and a reduction (see kernels/moe_routing.py and kernels/moe_gemm.py).

No repacking at load: the checkpoint layout (blocks (E, rows, in/32, 16) u8, scales (E, rows, in/32)
u8, rows = output channels, low nibble first) viewed as (E, rows, in/2) is already the packed
operand `tl.dot_scaled` takes, so the kernels read the loaded parameters in place (the K order they
need is obtained by permuting the activations instead, see kernels/moe_gemm.py).

Falls back to the reference, per call, for what the kernels do not cover (unquantized experts,
tensors off the GPU), and for the rest of the process if Triton cannot compile them here.
"""

from __future__ import annotations

import logging
import os

import torch
import triton

from minivllm.kernels import moe_gemm, moe_routing
from minivllm.ops import reference

logger = logging.getLogger(__name__)
_broken: str | None = None  # why the kernels failed to compile on this machine, if they did


def _runs_here(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, experts, top_k: int,
        swiglu_limit: float, swiglu_alpha: float) -> torch.Tensor:
    global _broken
    if _broken or not experts.quantized or not _runs_here(x) or x.dim() != 2 or router_weight.dtype != x.dtype:
        return reference.moe(x, router_weight, router_bias, experts, top_k, swiglu_limit, swiglu_alpha)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    try:
        return _moe(x.contiguous(), router_weight, router_bias, experts, top_k, swiglu_limit, swiglu_alpha)
    except Exception as e:
        if not _compile_failure(e):
            raise
        _broken = f"{type(e).__name__}: {e}"
        logger.warning("Triton MoE kernels do not compile here; using the torch reference (%s)", _broken)
        return reference.moe(x, router_weight, router_bias, experts, top_k, swiglu_limit, swiglu_alpha)


def _compile_failure(e: Exception) -> bool:
    """Triton could not build a kernel (front end, MLIR passes, ptxas, resources), as opposed to a
    launched kernel failing, which must not be hidden."""
    if isinstance(e, (triton.CompilationError, triton.OutOfResources)) or type(e).__name__ == "PTXASError":
        return True
    return isinstance(e, RuntimeError) and "PassManager" in str(e)


def packed_weights(experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_up blocks, gate_up scales, down blocks, down scales) as (E, N, K/2) and (E, N, K/32) views."""
    out = []
    for name in ("gate_up_proj", "down_proj"):
        blocks, scales = getattr(experts, f"{name}_blocks"), getattr(experts, f"{name}_scales")
        if not (blocks.is_contiguous() and scales.is_contiguous()):
            raise ValueError(f"experts.{name}_blocks/_scales must be contiguous (as loaded)")
        out += [blocks.view(*blocks.shape[:2], -1), scales]
    return tuple(out)


def _moe(x, router_weight, router_bias, experts, top_k, limit, alpha):
    routing = moe_routing.route(x, router_weight, router_bias, top_k)
    w1, s1, w2, s2 = packed_weights(experts)
    act = moe_gemm.gate_up(routing, w1, s1, experts.gate_up_proj_bias, limit, alpha)
    return moe_gemm.down(act, routing, w2, s2, experts.down_proj_bias, x.dtype)


# The MXFP4 path is launches only (no host syncs; its ticket counters re-arm themselves);
# unquantized experts go to the reference, which loops on the host.
moe.cuda_graph_safe = lambda config: config.quant_method == "mxfp4"

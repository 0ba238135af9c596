"""MXFP4 (OCP microscaling FP4): 32 e2m1 values share one e8m0 scale.

Checkpoint layout (GPT-OSS experts): blocks u8 (..., rows, in/32, 16), two values per byte, low
nibble = even element; scales u8 (..., rows, in/32), value = LUT[nibble] * 2^(scale - 127).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., rows, in/32, 16) u8 + (..., rows, in/32) u8 -> (..., rows, in) in `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]), dim=-1)  # (..., G, 16, 2)
    values = values.flatten(-3) if values.dim() >= 3 else values  # (..., G*32)
    exponents = scales.int() - 127
    values = values.view(*scales.shape, BLOCK) * torch.exp2(exponents.to(torch.float32)).to(dtype).unsqueeze(-1)
    return values.flatten(-2)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest MXFP4 of (..., rows, in) -> (blocks, scales). Used to make test checkpoints."""
    *prefix, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {in_features}")
    groups = weight.float().reshape(*prefix, in_features // BLOCK, BLOCK)
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    # Largest FP4 magnitude is 6 = 1.5 * 2^2: pick the exponent that puts amax at or below it.
    exponent = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    lut = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1)
    codes = codes | ((scaled < 0).int() << 3)
    codes = codes.to(torch.uint8).reshape(*prefix, in_features // BLOCK, BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()

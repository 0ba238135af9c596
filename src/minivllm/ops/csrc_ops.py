"""The csrc/ CUDA extension (fused residual add + RMSNorm, NeoX/YaRN rotary) behind the reference's
exact signatures and semantics (outputs are new tensors; inputs are never modified).

The extension is a prebuilt module `minivllm_csrc` when the image built one, else it is compiled
here on first import with torch.utils.cpp_extension.load (about 35 s on the device machine) and
cached under TORCH_EXTENSIONS_DIR. An image build without a GPU can fill that cache with
`python -m minivllm.ops.csrc_ops 9.0a`. Importing this module raises ImportError when neither works (no
CUDA, no nvcc), so the ops dispatch falls back to the reference. Calls the kernels do not cover
(CPU tensors, mixed dtypes) go to the reference too.
"""

from __future__ import annotations

import os

import torch

from minivllm.ops import reference

# The source tree's csrc/ (editable installs, the device machine); MINIVLLM_CSRC_DIR overrides.
_CSRC = os.environ.get("MINIVLLM_CSRC_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "..", "csrc")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build(arch: str | None = None, verbose: bool = False):
    """Compile (or load from the extension cache) the csrc/ extension, for `arch` ("9.0a") or the
    visible GPU. Works without a GPU when arch is given (an image build can warm the cache)."""
    from torch.utils.cpp_extension import load

    csrc = os.path.normpath(_CSRC)
    sources = [os.path.join(csrc, "binding.cpp"), os.path.join(csrc, "small_ops.cu")]
    if not all(os.path.exists(s) for s in sources):
        raise ImportError(f"csrc sources not found under {csrc}")
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = saved or ("9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        return load(name="minivllm_csrc", sources=sources, extra_include_paths=[csrc],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=verbose)
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _load():
    if not torch.cuda.is_available():
        raise ImportError("the csrc extension needs a CUDA device")
    try:
        import minivllm_csrc  # prebuilt by the image

        return minivllm_csrc
    except ImportError:
        pass
    try:
        return build()
    except Exception as e:  # a failed build must not take the engine down: the reference takes over
        raise ImportError(f"could not build the csrc extension: {e}") from e


if __name__ == "__main__":  # python -m minivllm.ops.csrc_ops [ARCH]: build into the cache, no GPU needed
    import sys

    build(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True)
    raise SystemExit(0)

_ext = _load()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if not (x.is_cuda and x.dim() == 2 and x.dtype in _DTYPES and weight.dtype == x.dtype
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))):
        return reference.rms_norm(x, weight, eps, residual)
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is None:
        return _ext.rms_norm(x, weight.contiguous(), float(eps), None)[0]
    if residual.stride(1) != 1:
        residual = residual.contiguous()
    out, new_residual = _ext.rms_norm(x, weight.contiguous(), float(eps), residual)
    return out, new_residual


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    if not (q.is_cuda and q.dim() == 3 and k.dim() == 3 and q.dtype in _DTYPES and k.dtype == q.dtype
            and cos_sin_cache.dtype == torch.float32):
        return reference.rotary(q, k, positions, cos_sin_cache)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    q_out, k_out = _ext.rotary(q, k, positions.to(torch.int64).contiguous(), cos_sin_cache.contiguous())
    return q_out, k_out


# Plain kernel launches or tensor math on every path: safe inside a captured decode graph.
rms_norm.cuda_graph_safe = True
rotary.cuda_graph_safe = True

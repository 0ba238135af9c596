// Small fused ops that dominate launches at batch 1: residual add + RMSNorm, NeoX rotary on q/k.
//
// Plain CUDA with raw pointers and no torch headers, so small_ops.cu compiles on its own with nvcc
// (CI checks it for sm_90a without a GPU); binding.cpp adapts torch tensors to these launchers.
// Both kernels reproduce the torch reference's roundings (see src/minivllm/ops/reference.py), so
// the outputs match it bit for bit apart from the order of the RMS sum.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace minivllm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[r] = weight * T(x'[r] * rsqrt(mean(x'[r]^2) + eps)), x' = T(x + residual) when residual is
// given (then also written to residual_out), else x. Rows of `hidden` contiguous elements; `out`
// and `residual_out` are contiguous (rows, hidden).
cudaError_t rms_norm(void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                     int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t residual_row_stride, float eps,
                     DType dtype, cudaStream_t stream);

// NeoX (half-split) rotary: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin with cos/sin = the fp32
// cache row [cos | sin] of each token's position (YaRN scaling is baked into the cache). q (T, Hq, D)
// and k (T, Hkv, D) with the head dim contiguous; q_out/k_out are contiguous.
cudaError_t rotary(void* q_out, void* k_out, const void* q, const void* k, const int64_t* positions,
                   const float* cos_sin_cache, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim,
                   int64_t q_stride_token, int64_t q_stride_head, int64_t k_stride_token, int64_t k_stride_head,
                   DType dtype, cudaStream_t stream);

}  // namespace minivllm

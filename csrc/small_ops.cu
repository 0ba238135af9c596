// Kernels and launchers declared in small_ops.h. Built for sm_90a (H100/H200); nothing here needs
// more than sm_80, so other GPUs build it for their own arch.
#include "small_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace minivllm {
namespace {

template <typename T>
struct Num;

template <>
struct Num<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Round a float to T and back: what an elementwise torch op on T tensors does to each result.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return Num<T>::to_float(Num<T>::from_float(v));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

constexpr int kNormThreads = 256;

template <int kThreads>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every thread holds the total
}

// One CTA per row. Pass 1 adds the residual (rounded to T like the reference's `x + residual`),
// writes the new residual stream and sums squares in fp32; pass 2 re-reads the row (its own
// writes, from L1/L2) and scales it. The reference rounds the normalized row to T before
// multiplying by the weight, and so do we.
template <typename T, int V, bool kResidual>
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                    const T* __restrict__ residual, const T* __restrict__ weight, int hidden, int64_t x_stride,
                    int64_t residual_stride, float eps) {
  using VecT = Vec<T, V>;
  const int64_t row = blockIdx.x;
  const int vecs = hidden / V;
  const VecT* xv = reinterpret_cast<const VecT*>(x + row * x_stride);
  const T* src = kResidual ? residual_out + row * hidden : x + row * x_stride;

  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < vecs; i += kNormThreads) {
    VecT a = xv[i];
    if constexpr (kResidual) {
      const VecT b = reinterpret_cast<const VecT*>(residual + row * residual_stride)[i];
#pragma unroll
      for (int j = 0; j < V; ++j)
        a.v[j] = Num<T>::from_float(__fadd_rn(Num<T>::to_float(a.v[j]), Num<T>::to_float(b.v[j])));
      reinterpret_cast<VecT*>(residual_out + row * hidden)[i] = a;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float f = Num<T>::to_float(a.v[j]);
      sum_sq = fmaf(f, f, sum_sq);
    }
  }
  const float inv_rms = rsqrtf(block_sum<kNormThreads>(sum_sq) / static_cast<float>(hidden) + eps);

  const VecT* sv = reinterpret_cast<const VecT*>(src);
  const VecT* wv = reinterpret_cast<const VecT*>(weight);
  VecT* ov = reinterpret_cast<VecT*>(out + row * hidden);
  for (int i = threadIdx.x; i < vecs; i += kNormThreads) {
    const VecT a = sv[i], w = wv[i];
    VecT o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float normed = round_to<T>(__fmul_rn(Num<T>::to_float(a.v[j]), inv_rms));
      o.v[j] = Num<T>::from_float(__fmul_rn(Num<T>::to_float(w.v[j]), normed));
    }
    ov[i] = o;
  }
}

template <typename T, int V>
void launch_rms_norm(void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                     int64_t rows, int64_t hidden, int64_t x_stride, int64_t residual_stride, float eps,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows)), block(kNormThreads);
  if (residual != nullptr) {
    rms_norm_kernel<T, V, true><<<grid, block, 0, stream>>>(
        static_cast<T*>(out), static_cast<T*>(residual_out), static_cast<const T*>(x),
        static_cast<const T*>(residual), static_cast<const T*>(weight), static_cast<int>(hidden), x_stride,
        residual_stride, eps);
  } else {
    rms_norm_kernel<T, V, false><<<grid, block, 0, stream>>>(
        static_cast<T*>(out), nullptr, static_cast<const T*>(x), nullptr, static_cast<const T*>(weight),
        static_cast<int>(hidden), x_stride, 0, eps);
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
void dispatch_rms_norm(void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                       int64_t rows, int64_t hidden, int64_t x_stride, int64_t residual_stride, float eps,
                       cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);  // 16-byte loads
  const bool vec_ok = hidden % V == 0 && x_stride % V == 0 && aligned(x, 16) && aligned(weight, 16) &&
                      aligned(out, 16) &&
                      (residual == nullptr ||
                       (residual_stride % V == 0 && aligned(residual, 16) && aligned(residual_out, 16)));
  if (vec_ok)
    launch_rms_norm<T, V>(out, residual_out, x, residual, weight, rows, hidden, x_stride, residual_stride, eps, stream);
  else
    launch_rms_norm<T, 1>(out, residual_out, x, residual, weight, rows, hidden, x_stride, residual_stride, eps, stream);
}

// One CTA per token; a thread per (head, i < D/2) pair, q heads first, then k heads. cos/sin are
// rounded to T and every product and sum rounded to T, exactly as the reference's T arithmetic.
template <typename T>
__global__ void rotary_kernel(T* __restrict__ q_out, T* __restrict__ k_out, const T* __restrict__ q,
                              const T* __restrict__ k, const int64_t* __restrict__ positions,
                              const float* __restrict__ cos_sin_cache, int num_q_heads, int num_kv_heads,
                              int head_dim, int64_t q_stride_token, int64_t q_stride_head, int64_t k_stride_token,
                              int64_t k_stride_head) {
  const int64_t token = blockIdx.x;
  const int half = head_dim / 2;
  const float* cs = cos_sin_cache + positions[token] * head_dim;
  const int total = (num_q_heads + num_kv_heads) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    int head = idx / half;
    const int i = idx - head * half;
    const T* src;
    T* dst;
    if (head < num_q_heads) {
      src = q + token * q_stride_token + head * q_stride_head;
      dst = q_out + (token * num_q_heads + head) * head_dim;
    } else {
      head -= num_q_heads;
      src = k + token * k_stride_token + head * k_stride_head;
      dst = k_out + (token * num_kv_heads + head) * head_dim;
    }
    const float c = round_to<T>(cs[i]), s = round_to<T>(cs[half + i]);
    const float x1 = Num<T>::to_float(src[i]), x2 = Num<T>::to_float(src[half + i]);
    dst[i] = Num<T>::from_float(__fsub_rn(round_to<T>(__fmul_rn(x1, c)), round_to<T>(__fmul_rn(x2, s))));
    dst[half + i] = Num<T>::from_float(__fadd_rn(round_to<T>(__fmul_rn(x2, c)), round_to<T>(__fmul_rn(x1, s))));
  }
}

template <typename T>
void launch_rotary(void* q_out, void* k_out, const void* q, const void* k, const int64_t* positions,
                   const float* cos_sin_cache, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim,
                   int64_t q_stride_token, int64_t q_stride_head, int64_t k_stride_token, int64_t k_stride_head,
                   cudaStream_t stream) {
  const int pairs = (num_q_heads + num_kv_heads) * head_dim / 2;
  const int threads = pairs >= 512 ? 512 : ((pairs + 31) / 32) * 32;
  rotary_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
      static_cast<T*>(q_out), static_cast<T*>(k_out), static_cast<const T*>(q), static_cast<const T*>(k), positions,
      cos_sin_cache, num_q_heads, num_kv_heads, head_dim, q_stride_token, q_stride_head, k_stride_token,
      k_stride_head);
}

}  // namespace

cudaError_t rms_norm(void* out, void* residual_out, const void* x, const void* residual, const void* weight,
                     int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t residual_row_stride, float eps,
                     DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      dispatch_rms_norm<float>(out, residual_out, x, residual, weight, rows, hidden, x_row_stride,
                               residual_row_stride, eps, stream);
      break;
    case DType::kFloat16:
      dispatch_rms_norm<__half>(out, residual_out, x, residual, weight, rows, hidden, x_row_stride,
                                residual_row_stride, eps, stream);
      break;
    case DType::kBFloat16:
      dispatch_rms_norm<__nv_bfloat16>(out, residual_out, x, residual, weight, rows, hidden, x_row_stride,
                                       residual_row_stride, eps, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t rotary(void* q_out, void* k_out, const void* q, const void* k, const int64_t* positions,
                   const float* cos_sin_cache, int64_t tokens, int num_q_heads, int num_kv_heads, int head_dim,
                   int64_t q_stride_token, int64_t q_stride_head, int64_t k_stride_token, int64_t k_stride_head,
                   DType dtype, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (head_dim % 2 != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      launch_rotary<float>(q_out, k_out, q, k, positions, cos_sin_cache, tokens, num_q_heads, num_kv_heads, head_dim,
                           q_stride_token, q_stride_head, k_stride_token, k_stride_head, stream);
      break;
    case DType::kFloat16:
      launch_rotary<__half>(q_out, k_out, q, k, positions, cos_sin_cache, tokens, num_q_heads, num_kv_heads,
                            head_dim, q_stride_token, q_stride_head, k_stride_token, k_stride_head, stream);
      break;
    case DType::kBFloat16:
      launch_rotary<__nv_bfloat16>(q_out, k_out, q, k, positions, cos_sin_cache, tokens, num_q_heads, num_kv_heads,
                                   head_dim, q_stride_token, q_stride_head, k_stride_token, k_stride_head, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace minivllm

// Torch binding of small_ops.cu: tensor checks, output allocation, the current CUDA stream.
// Python wrapper with the reference's signatures: src/minivllm/ops/csrc_ops.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "small_ops.h"

namespace {

minivllm::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return minivllm::DType::kFloat32;
    case torch::kFloat16:
      return minivllm::DType::kFloat16;
    case torch::kBFloat16:
      return minivllm::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "minivllm csrc: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "minivllm csrc ", op, ": ", cudaGetErrorString(err));
}

// (out) or (out, new residual); never modifies its inputs, like the reference.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    std::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be a CUDA (rows, hidden) tensor");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.dtype() == x.dtype() && weight.is_contiguous() && weight.numel() == hidden,
              "rms_norm: weight must be contiguous (hidden,) of x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({rows, hidden}, x.options());
  torch::Tensor residual_out;
  const void* residual_ptr = nullptr;
  int64_t residual_stride = 0;
  if (residual.has_value()) {
    const auto& r = *residual;
    TORCH_CHECK(r.dtype() == x.dtype() && r.sizes() == x.sizes() && r.stride(1) == 1,
                "rms_norm: residual must match x");
    residual_out = torch::empty({rows, hidden}, x.options());
    residual_ptr = r.data_ptr();
    residual_stride = r.stride(0);
  }
  check_launch(minivllm::rms_norm(out.data_ptr(), residual.has_value() ? residual_out.data_ptr() : nullptr,
                                  x.data_ptr(), residual_ptr, weight.data_ptr(), rows, hidden, x.stride(0),
                                  residual_stride, static_cast<float>(eps), dtype_of(x),
                                  c10::cuda::getCurrentCUDAStream()),
               "rms_norm");
  if (residual.has_value()) return {out, residual_out};
  return {out};
}

std::vector<torch::Tensor> rotary(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                  torch::Tensor cos_sin_cache) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary: q, k must be CUDA (tokens, heads, head_dim) with head_dim contiguous");
  TORCH_CHECK(q.dtype() == k.dtype() && q.size(0) == k.size(0) && q.size(2) == k.size(2), "rotary: q/k mismatch");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.numel() == q.size(0),
              "rotary: positions must be contiguous int64 (tokens,)");
  TORCH_CHECK(cos_sin_cache.scalar_type() == torch::kFloat32 && cos_sin_cache.is_contiguous() &&
                  cos_sin_cache.size(1) == q.size(2),
              "rotary: cos_sin_cache must be contiguous float32 (max_pos, head_dim)");
  const c10::cuda::CUDAGuard guard(q.device());
  auto q_out = torch::empty(q.sizes(), q.options());
  auto k_out = torch::empty(k.sizes(), k.options());
  check_launch(minivllm::rotary(q_out.data_ptr(), k_out.data_ptr(), q.data_ptr(), k.data_ptr(),
                                positions.data_ptr<int64_t>(), cos_sin_cache.data_ptr<float>(), q.size(0),
                                static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), static_cast<int>(q.size(2)),
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), dtype_of(q),
                                c10::cuda::getCurrentCUDAStream()),
               "rotary");
  return {q_out, k_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "fused residual add + RMSNorm", py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none());
  m.def("rotary", &rotary, "NeoX rotary embedding of q and k", py::arg("q"), py::arg("k"), py::arg("positions"),
        py::arg("cos_sin_cache"));
}

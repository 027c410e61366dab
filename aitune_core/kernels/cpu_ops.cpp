// The ops aitune::int8_weight_only_mm, int8_amx_mm, int4_weight_only_mm and cached_attention for CPU tensors (ops.py defines
// them, with a torch implementation for every device): registered here, calls from a compiled graph or an
// AOTInductor package reach the kernels without Python. What a kernel does not take (rows past max_rows(),
// another dtype) runs the same math in ATen, as ops.py does.
#include "cpu_kernels.h"

#include <torch/library.h>

namespace {

torch::Tensor int8_op(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale) {
  if (x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) <= max_rows())
    return int8_weight_only_mm(x, weight, scale);
  return at::matmul(x, (weight.to(scale.scalar_type()) * scale.unsqueeze(1)).to(x.scalar_type()).t());
}

torch::Tensor int8_amx_op(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale) {
  static const bool amx = tiles().rfind("AMX", 0) == 0;
  if (amx && x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && x.dim() == 2 &&
      x.size(0) <= max_rows())
    return int8_amx_packed_mm(x, packed, scale);
  const int64_t rows = packed.size(0), columns = packed.size(1);
  const auto weight = packed.view({rows / 16, columns / 64, 16, 16, 4}).permute({0, 3, 1, 2, 4}).reshape({rows, columns});
  return at::matmul(x, (weight.to(scale.scalar_type()) * scale.unsqueeze(1)).to(x.scalar_type()).t());
}

torch::Tensor int4_op(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                      const torch::Tensor& offset, int64_t group_size) {
  if (x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
      x.dim() == 2 && x.size(0) <= max_rows())
    return int4_weight_only_mm(x, packed, scale, offset, group_size);
  const int64_t rows = packed.size(0);
  const auto blocks = packed.view({rows, -1, 16});
  const auto q = at::stack({blocks.bitwise_and(15), blocks.bitwise_right_shift(4)}, 2).view({rows, -1, group_size});
  const auto weight = (q.to(scale.scalar_type()) * scale.unsqueeze(-1) + offset.unsqueeze(-1)).view({rows, -1});
  return at::matmul(x, weight.to(x.scalar_type()).t());
}

void register_cpu_kernels() {
  static torch::Library library(torch::Library::IMPL, "aitune", c10::DispatchKey::CPU, __FILE__, __LINE__);
  static const bool registered = [] {
    library.impl("int8_weight_only_mm", TORCH_FN(int8_op));
    library.impl("int8_amx_mm", TORCH_FN(int8_amx_op));
    library.impl("int4_weight_only_mm", TORCH_FN(int4_op));
    library.impl("cached_attention", TORCH_FN(cached_attention));
    return true;
  }();
  (void)registered;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_cpu_kernels", &register_cpu_kernels);
  m.def("tiles", &tiles);
  m.def("max_rows", &max_rows);
  // Called from Python (the ops' torch implementation, before or without the registration): the GIL is let go,
  // so a model on its own thread does not hold up the thread that talks to TorchServe.
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("int8_weight_only_mm", &int8_weight_only_mm, release);
  m.def("int4_weight_only_mm", &int4_weight_only_mm, release);
  m.def("int8_amx_packed_mm", &int8_amx_packed_mm, release);
  m.def("cached_attention", &cached_attention, release);
}

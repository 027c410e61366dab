// The CPU kernels as tensors: each function checks and prepares its tensors, allocates the output and calls the
// kernels (cpu_kernels.h) of the level this library was built for; the ops aitune::int8_weight_only_mm,
// int8_amx_mm, int4_weight_only_mm and cached_attention (ops.py defines them, with a torch implementation for
// every device) registered for CPU tensors, so that calls from a compiled graph or an AOTInductor package reach
// the kernels without Python; and the Python module build.py loads. What a kernel does not take (rows past
// max_rows(), another dtype) runs the same math in ATen, as ops.py does.
//
// Compiled once, at the baseline level (the heavy headers: torch's library API and pybind), and linked into every
// level's library: no instruction-set specific code lives here.
#include "cpu_kernels.h"

// Not torch/extension.h (all of torch's C++ API: twice the compile time): ATen, the library API, pybind's casters.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>

namespace aitune {

void matmul(const float* a, int64_t M, int64_t K, const float* b, int64_t N, bool b_transposed, float* c) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const auto left = at::from_blob(const_cast<float*>(a), {M, K}, options);
  const auto right = b_transposed ? at::from_blob(const_cast<float*>(b), {N, K}, options).t()
                                  : at::from_blob(const_cast<float*>(b), {K, N}, options);
  auto out = at::from_blob(c, {M, N}, options);
  at::mm_out(out, left, right);
}

}  // namespace aitune

namespace {

// x fp32 [M, K], weight int8 [N, K], scale fp32 [N] -> fp32 [M, N].
at::Tensor int8_weight_only_mm(at::Tensor x, at::Tensor weight, at::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_weight_only_mm: x must be fp32 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
              "int8_weight_only_mm: weight must be int8 [N, K] with x's K = ", x.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == weight.size(0),
              "int8_weight_only_mm: scale must be fp32 [N]");
  x = x.contiguous(), weight = weight.contiguous(), scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = at::empty({M, N}, x.options());
  aitune::int8_mm(x.data_ptr<float>(), M, K, weight.data_ptr<int8_t>(), scale.data_ptr<float>(), N,
                  out.data_ptr<float>());
  return out;
}

// x fp32 [M, K], packed uint8 [N, K / 2], scale and offset fp32 [N, K / G] -> fp32 [M, N].
at::Tensor int4_weight_only_mm(at::Tensor x, at::Tensor packed, at::Tensor scale, at::Tensor offset,
                                  int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_weight_only_mm: x must be fp32 [M, K]");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && x.size(1) % group_size == 0,
              "int4_weight_only_mm: group_size must be a multiple of 32 dividing K = ", x.size(1), ", got ", group_size);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.size(1) * 2 == x.size(1),
              "int4_weight_only_mm: packed must be uint8 [N, K / 2] with x's K = ", x.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                  scale.numel() == packed.size(0) * (x.size(1) / group_size) && offset.numel() == scale.numel(),
              "int4_weight_only_mm: scale and offset must be fp32 [N, K / group_size]");
  x = x.contiguous(), packed = packed.contiguous(), scale = scale.contiguous(), offset = offset.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  auto out = at::empty({M, N}, x.options());
  aitune::int4_mm(x.data_ptr<float>(), M, K, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                  offset.data_ptr<float>(), group_size, N, out.data_ptr<float>());
  return out;
}

// x fp32 [M, K], weight int8 [N, K] in the AMX layout (ops.pack_int8_amx; K a multiple of 64, N of 16), scale fp32
// [N] -> fp32 [M, N]. Needs AMX granted (tiles() starts with "AMX").
at::Tensor int8_amx_packed_mm(at::Tensor x, at::Tensor packed, at::Tensor scale) {
  TORCH_CHECK(aitune::amx_usable(), "int8_amx_packed_mm: this build runs no AMX tiles here (", aitune::tiles(), ")");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 64 == 0,
              "int8_amx_packed_mm: x must be fp32 [M, K] with K a multiple of 64");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar && packed.size(1) == x.size(1) &&
                  packed.size(0) % 16 == 0,
              "int8_amx_packed_mm: packed must be int8 [N, K] (ops.pack_int8_amx) with x's K");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == packed.size(0), "scale must be fp32 [N]");
  x = x.contiguous(), packed = packed.contiguous(), scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  auto out = at::empty({M, N}, x.options());
  aitune::int8_amx_packed_mm(x.data_ptr<float>(), M, K, packed.data_ptr<int8_t>(), scale.data_ptr<float>(), N,
                             out.data_ptr<float>());
  return out;
}

// q [B, L, H, D] attends, in slot slots[b] of the caches [S, KV, C, D], to the positions up to positions[b, t]
// -> [B, L, H, D] (the query heads h*G .. h*G+G-1 share kv head h).
at::Tensor cached_attention(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                               const at::Tensor& v_cache_in, const at::Tensor& slots_in,
                               const at::Tensor& positions_in) {
  TORCH_CHECK(q_in.dim() == 4, "cached_attention: q must be [batch, length, heads, head_dim], got ", q_in.sizes());
  TORCH_CHECK(k_cache_in.dim() == 4 && k_cache_in.sizes() == v_cache_in.sizes(),
              "cached_attention: the caches must both be [slots, kv_heads, context, head_dim], got ",
              k_cache_in.sizes(), " and ", v_cache_in.sizes());
  const int64_t B = q_in.size(0), L = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t S = k_cache_in.size(0), KV = k_cache_in.size(1), C = k_cache_in.size(2);
  TORCH_CHECK(k_cache_in.size(3) == D && KV > 0 && H % KV == 0,
              "cached_attention: the caches' head_dim must be q's (", D, ") and their kv heads divide q's ", H,
              " heads, got ", k_cache_in.sizes());
  TORCH_CHECK(!at::isFloatingType(slots_in.scalar_type()) && slots_in.dim() == 1 && slots_in.size(0) == B,
              "cached_attention: slots must be integers [batch = ", B, "], got ", slots_in.sizes());
  TORCH_CHECK(!at::isFloatingType(positions_in.scalar_type()) && positions_in.dim() == 2 &&
                  positions_in.size(0) == B && positions_in.size(1) == L,
              "cached_attention: positions must be integers [batch, length] = [", B, ", ", L, "], got ",
              positions_in.sizes());
  const auto slots = slots_in.to(at::kLong).contiguous();
  const auto positions = positions_in.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  int64_t last = -1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "cached_attention: slot ", slot[b], " of row ", b, " is not in [0, ", S,
                ")");
    for (int64_t t = 0; t < L; ++t) {
      const int64_t p = position[b * L + t];
      TORCH_CHECK(p >= 0 && p < C, "cached_attention: position ", p, " of row ", b, " is not in [0, ", C, ")");
      last = p > last ? p : last;
    }
  }
  const auto cache_type = k_cache_in.scalar_type();
  const bool native = q_in.scalar_type() == at::kFloat && v_cache_in.scalar_type() == cache_type &&
                      (cache_type == at::kFloat || cache_type == at::kBFloat16);
  if (!native) {
    // Another dtype: the rows' windows only, in fp32, each in its own slot; the answer in q's dtype.
    const auto window = [&](const at::Tensor& cache) {
      return cache.slice(2, 0, last + 1).index_select(0, slots).to(at::kFloat);
    };
    const auto rows = at::arange(B, slots.options());
    return cached_attention(q_in.to(at::kFloat), window(k_cache_in), window(v_cache_in), rows, positions)
        .to(q_in.scalar_type());
  }
  const auto q = q_in.contiguous();
  const auto k_cache = k_cache_in.contiguous(), v_cache = v_cache_in.contiguous();
  auto out = at::empty({B, L, H, D}, q.options());
  aitune::cached_attention(aitune::AttentionShape{B, L, H, D, KV, C}, q.data_ptr<float>(), k_cache.data_ptr(),
                           v_cache.data_ptr(), cache_type == at::kBFloat16, slot, position, out.data_ptr<float>());
  return out;
}

at::Tensor int8_op(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  if (x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && x.dim() == 2 &&
      x.size(0) <= aitune::max_rows())
    return int8_weight_only_mm(x, weight, scale);
  return at::matmul(x, (weight.to(scale.scalar_type()) * scale.unsqueeze(1)).to(x.scalar_type()).t());
}

at::Tensor int8_amx_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  if (aitune::amx_usable() && x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && x.dim() == 2 &&
      x.size(0) <= aitune::max_rows())
    return int8_amx_packed_mm(x, packed, scale);
  const int64_t rows = packed.size(0), columns = packed.size(1);
  const auto weight = packed.view({rows / 16, columns / 64, 16, 16, 4}).permute({0, 3, 1, 2, 4}).reshape({rows, columns});
  return at::matmul(x, (weight.to(scale.scalar_type()) * scale.unsqueeze(1)).to(x.scalar_type()).t());
}

at::Tensor int4_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const at::Tensor& offset, int64_t group_size) {
  if (x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
      x.dim() == 2 && x.size(0) <= aitune::max_rows())
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
  m.def("tiles", [] { return std::string(aitune::tiles()); });
  m.def("max_rows", &aitune::max_rows);
  // Called from Python (the ops' torch implementation, before or without the registration): the GIL is let go,
  // so a model on its own thread does not hold up the thread that talks to TorchServe.
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("int8_weight_only_mm", &int8_weight_only_mm, release);
  m.def("int4_weight_only_mm", &int4_weight_only_mm, release);
  m.def("int8_amx_packed_mm", &int8_amx_packed_mm, release);
  m.def("cached_attention", &cached_attention, release);
}

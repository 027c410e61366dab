// What the CPU kernels export to one another: cpu_weight_only.cpp and cpu_amx_packed.cpp (products; what their
// AMX paths share is in cpu_amx.h), cpu_attention.cpp (attention of decode rows over a KV cache), cpu_ops.cpp
// (their registration as the aitune ops' CPU implementation, and the Python module build.py loads).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>

// x fp32 [M, K], weight int8 [N, K], scale fp32 [N] -> fp32 [M, N].
torch::Tensor int8_weight_only_mm(torch::Tensor x, torch::Tensor weight, torch::Tensor scale);
// x fp32 [M, K], packed uint8 [N, K / 2], scale and offset fp32 [N, K / G] -> fp32 [M, N].
torch::Tensor int4_weight_only_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                                  int64_t group_size);
// Which tiles the products run, for the worker's ready line.
std::string tiles();
// The most rows the products beat a dequantize-then-matmul at.
int64_t max_rows();
// q [B, L, H, D] attends, in slot slots[b] of the caches [S, KV, C, D], to the positions up to positions[b, t]
// -> [B, L, H, D] (the query heads h*G .. h*G+G-1 share kv head h).
torch::Tensor cached_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& slots, const torch::Tensor& positions);
// x fp32 [M, K], weight int8 [N, K] in the AMX layout (ops.pack_int8_amx; K a multiple of 64, N of 16), scale fp32
// [N] -> fp32 [M, N]. Needs AMX granted (tiles() starts with "AMX").
torch::Tensor int8_amx_packed_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale);

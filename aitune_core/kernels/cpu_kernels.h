// What the CPU kernels export to one another. The kernels (cpu_weight_only.cpp and cpu_amx_packed.cpp: products,
// their AMX paths sharing cpu_amx.h; cpu_attention.cpp: attention of query rows over a KV cache) are compiled once
// per instruction-set level and see no torch header but ATen's parallel_for: they take contiguous buffers, checked
// and allocated by cpu_ops.cpp (the ops' registration and the Python module build.py loads), which is compiled once
// and gives the kernels the one thing they take from torch, a matrix product.
#pragma once

#include <cstdint>

namespace aitune {

// out fp32 [M, N] = x fp32 [M, K] @ (weight int8 [N, K] * scale fp32 [N]).T
void int8_mm(const float* x, int64_t M, int64_t K, const int8_t* weight, const float* scale, int64_t N, float* out);
// out fp32 [M, N] = x fp32 [M, K] @ W.T, W int4 in packed uint8 [N, K / 2], scale and offset fp32 [N, K / G]
// (G = group_size, a multiple of 32 dividing K).
void int4_mm(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* scale, const float* offset,
             int64_t group_size, int64_t N, float* out);
// int8_mm of weights in the AMX layout (ops.pack_int8_amx; K a multiple of 64, N of 16). Only where amx_usable().
void int8_amx_packed_mm(const float* x, int64_t M, int64_t K, const int8_t* packed, const float* scale, int64_t N,
                        float* out);
// Built with AMX and granted its tile state by the OS.
bool amx_usable();
// Which tiles this build runs, for the worker's ready line.
const char* tiles();
// The most rows the products beat a dequantize-then-matmul at.
int64_t max_rows();

struct AttentionShape {
  int64_t B, L, H, D, KV, C;  // rows, tokens a row, query heads, head_dim, kv heads, cache positions
};
// q fp32 [B, L, H, D] attends, in slot slot[b] of the caches [S, KV, C, D] (fp32, or bf16 as its bits), to the
// positions up to position[b * L + t] -> out fp32 [B, L, H, D] (the query heads h*G .. h*G+G-1 share kv head h).
void cached_attention(const AttentionShape& shape, const float* q, const void* k_cache, const void* v_cache,
                      bool bf16_cache, const int64_t* slot, const int64_t* position, float* out);

// What the kernels take from torch (cpu_ops.cpp): c [M, N] = a [M, K] @ b.T for b [N, K] (b_transposed), or
// a @ b for b [K, N]; all fp32 and contiguous.
void matmul(const float* a, int64_t M, int64_t K, const float* b, int64_t N, bool b_transposed, float* c);

}  // namespace aitune

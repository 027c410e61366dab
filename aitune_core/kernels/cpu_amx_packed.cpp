// int8 weight-only products on AMX with the weights as the tile unit's second operand, packed as it wants them
// (ops.pack_int8_amx: a layer's weights take this layout when it loads on a CPU with AMX), and each activation
// row's three int8 pieces (as in cpu_weight_only.cpp: fp32's precision) as rows of the first operand. A
// 16-output x 64-input weight tile is then one contiguous 1 KB read, a tile instruction costs by the pieces'
// rows (3 a row, not 16 weight rows), and each row's outputs come out as rows of the sums (three multiply-adds,
// no transpose). Layout of the packed weights: [N/16][K/64][16 quads][16 outputs][4 inputs].
#include "cpu_amx.h"
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(AITUNE_AMX)
namespace {

using aitune_amx::kPieces;
constexpr int kRowsPerGroup = 16;  // 48 pieces rows: three first-operand tiles (2, 3, 4), three sums (5, 6, 7)
constexpr int64_t kBlocksAtATime = 4;  // 64 outputs x K inputs of weights

// x [M, K] -> pieces [3M, K] int8 (row 3m + p: piece p of row m) and mult[3m + p], the weight of that piece.
void split(const float* x, int64_t M, int64_t K, std::vector<int8_t>& pieces, std::vector<float>& mult) {
  pieces.resize(static_cast<size_t>(kPieces * M * K));
  mult.resize(static_cast<size_t>(kPieces * M));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    const float s = aitune_amx::row_scale(row, K);
    const __m512 inverse = _mm512_set1_ps(1.f / s);
    for (int p = 0; p < kPieces; ++p) mult[kPieces * m + p] = aitune_amx::piece_weight(s, p);
    for (int64_t k = 0; k < K; k += 16) {
      __m128i piece[kPieces];
      aitune_amx::split16(_mm512_mul_ps(_mm512_loadu_ps(row + k), inverse), piece);
      for (int p = 0; p < kPieces; ++p) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(pieces.data() + (kPieces * m + p) * K + k), piece[p]);
      }
    }
  }
}

// Rows m0 .. m0 + rows (<= 16) against output blocks b0 .. b1.
template <int T>
void group_blocks(const int8_t* pieces, const float* mult, int64_t m0, int64_t rows, int64_t K, const int8_t* packed,
                  const float* scale, float* out, int64_t N, int64_t b0, int64_t b1) {
  alignas(64) int32_t sums[3][256];
  const int8_t* a = pieces + kPieces * m0 * K;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = packed + b * 16 * K;
    _tile_zero(5);
    if constexpr (T > 1) _tile_zero(6);
    if constexpr (T > 2) _tile_zero(7);
    for (int64_t k = 0; k < K; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k * 16 + 4096), _MM_HINT_T0);
      _tile_loadd(0, w + k * 16, 64);
      _tile_loadd(2, a + k, K);
      _tile_dpbssd(5, 2, 0);
      if constexpr (T > 1) { _tile_loadd(3, a + 16 * K + k, K); _tile_dpbssd(6, 3, 0); }
      if constexpr (T > 2) { _tile_loadd(4, a + 32 * K + k, K); _tile_dpbssd(7, 4, 0); }
    }
    _tile_stored(5, sums[0], 64);
    if constexpr (T > 1) _tile_stored(6, sums[1], 64);
    if constexpr (T > 2) _tile_stored(7, sums[2], 64);
    const __m512 s = _mm512_loadu_ps(scale + b * 16);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int p = 0; p < kPieces; ++p) {
        const int64_t i = kPieces * r + p;
        acc = _mm512_fmadd_ps(_mm512_set1_ps(mult[kPieces * (m0 + r) + p]),
                              _mm512_cvtepi32_ps(_mm512_load_si512(sums[i / 16] + (i % 16) * 16)), acc);
      }
      _mm512_storeu_ps(out + (m0 + r) * N + b * 16, _mm512_mul_ps(acc, s));
    }
  }
}

}  // namespace

namespace aitune {

void int8_amx_packed_mm(const float* xp, int64_t M, int64_t K, const int8_t* wp, const float* sp, int64_t N,
                        float* op) {
  if (M == 0) return;
  thread_local std::vector<int8_t> pieces;
  thread_local std::vector<float> mult;
  split(xp, M, K, pieces, mult);
  const int8_t* pp = pieces.data();
  const float* mp = mult.data();
  at::parallel_for(0, N / 16, 6, [&](int64_t first, int64_t last) {
    // A few blocks at a time under every group of rows: the blocks' weights stay in L2 while the groups read them.
    for (int64_t b0 = first; b0 < last; b0 += kBlocksAtATime) {
      const int64_t b1 = std::min(b0 + kBlocksAtATime, last);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsPerGroup) {
        const int64_t rows = std::min<int64_t>(kRowsPerGroup, M - m0), piece_rows = kPieces * rows;
        const int T = static_cast<int>((piece_rows + 15) / 16);
        aitune_amx::TileConfig config;
        config.set(0, 16, 64);  // weights: 16 quads x 16 outputs x 4
        for (int g = 0; g < T; ++g) {
          const int r = static_cast<int>(std::min<int64_t>(16, piece_rows - 16 * g));
          config.set(2 + g, r, 64);  // pieces: r rows x 64 inputs
          config.set(5 + g, r, 64);  // sums: r rows x 16 outputs
        }
        _tile_loadconfig(&config);
        if (T == 1) group_blocks<1>(pp, mp, m0, rows, K, wp, sp, op, N, b0, b1);
        else if (T == 2) group_blocks<2>(pp, mp, m0, rows, K, wp, sp, op, N, b0, b1);
        else group_blocks<3>(pp, mp, m0, rows, K, wp, sp, op, N, b0, b1);
      }
    }
    _tile_release();
  });
}

}  // namespace aitune
#else
namespace aitune {

// Never called: cpu_ops.cpp runs this layout in ATen where amx_usable() is false, as it is in a build without AMX.
void int8_amx_packed_mm(const float*, int64_t, int64_t, const int8_t*, const float*, int64_t, float*) {}

}  // namespace aitune
#endif

// What the two AMX kernels share (cpu_weight_only.cpp: the weights as the tile unit's first operand, as they lie;
// cpu_amx_packed.cpp: as its second, reordered): the OS's grant, the tile configuration, and each activation row
// split in three int8 pieces, x = s * (a0 + a1 / 254 + a2 / 254^2) with s = max|x| / 127, so that int8 sums keep
// fp32's precision (the pieces hold x to ~6e-8 of max|x|, and int32 sums are exact).
#pragma once

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#define AITUNE_AMX 1

namespace aitune_amx {

constexpr int kPieces = 3;
constexpr float kPieceStep = 254.f;

// Linux hands a process AMX's tile state only when asked (arch_prctl), once, for all its threads.
inline bool usable() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int tile_rows, int bytes_a_row) {
    rows[tile] = static_cast<uint8_t>(tile_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_a_row);
  }
};

// A row's s. A row with an inf or a NaN gets NaN (its sums come out NaN, as fp32 would give inf or NaN: not a
// finite guess); a row of tiny values keeps 1 / s finite.
inline float row_scale(const float* row, int64_t K) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 not_finite = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(row + k));
    not_finite |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);  // inf or NaN
    amax = _mm512_max_ps(amax, v);
  }
  float top = _mm512_reduce_max_ps(amax);
  for (; k < K; ++k) {
    not_finite |= !std::isfinite(row[k]);
    top = std::max(top, std::abs(row[k]));
  }
  return not_finite ? NAN : top > 0.f ? std::max(top / 127.f, FLT_MIN) : 1.f;
}

// What piece p of a row of scale s weighs in the sums.
inline float piece_weight(float s, int p) { return s / std::pow(kPieceStep, static_cast<float>(p)); }

// 16 inputs of a row, times 1 / s, as their kPieces int8 pieces.
inline void split16(__m512 rest, __m128i (&pieces)[kPieces]) {
  const __m512 step = _mm512_set1_ps(kPieceStep);
  for (int p = 0; p < kPieces; ++p) {
    const __m512 whole = _mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    rest = _mm512_mul_ps(_mm512_sub_ps(rest, whole), step);
    pieces[p] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(whole));
  }
}

}  // namespace aitune_amx
#endif

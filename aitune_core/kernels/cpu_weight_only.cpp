// Weight-only int8 and int4 matrix products for a few rows (decode steps, one-text requests, prompt chunks) on
// CPUs. A product of few rows is bound by reading the weights, then by the instructions that multiply them.
// Built for each instruction-set level (build.py), its paths chosen by what that level's flags define:
// - with AMX (int8 tiles, granted by the OS): the tile unit takes the int8 weights as they lie and each
//   activation row split in three int8 pieces (fp32's precision): int8 at any row count, int4 from 8 rows
//   (unpacked to int8 a step at a time). See "AMX" below.
// - otherwise, and for what AMX leaves (the last < 16 weight rows, fewer int4 rows): tiles of R activation
//   rows x NB weight rows, each weight vector converted to fp32 once for R rows, each activation vector loaded
//   once for NB weight rows, the R x NB sums in registers across K: AVX-512 intrinsics, or without AVX-512,
//   a chunk of weights converted once and the dot products left to the compiler.
#include "cpu_amx.h"
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <cstdint>
#include <immintrin.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

// The AVX-512 tiles prefetch the next tile's weight rows at the offset they read: a thread's rows are one
// contiguous stream, but short rows (K = 1024: 1 KB) end before the hardware prefetcher has ramped up, and
// the next tile starts cold (measured on a 254M decoder's layers: 10.8 -> 17 GB/s at 1 row). Prefetches past
// the weights' end are hints and never fault.
constexpr int64_t kGrain = 96;  // output features a thread takes at a time (a multiple of the tiles' NB)

#if !defined(__AVX512F__)
// Without AVX-512 the tiles turn NB weight rows' next kChunk inputs into fp32 once, then take the R x NB
// dot products over them in loops the compiler vectorizes for whatever the CPU has.
constexpr int kChunk = 32;
constexpr int kLanes = 8;  // sums kept per lane, added up once at the end

template <int R, int NB>
inline void rows_dot_chunk(const float* x, int64_t K, const float (&chunk)[NB][kChunk], float (&lanes)[R][NB][kLanes]) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kChunk; i += kLanes)
      for (int j = 0; j < NB; ++j)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) lanes[r][j][l] += x[r * K + i + l] * chunk[j][i + l];
}

template <int R, int NB>
inline void add_lanes(const float (&lanes)[R][NB][kLanes], float (&sums)[R][NB]) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int l = 0; l < kLanes; ++l) sums[r][j] += lanes[r][j][l];
}
#endif

#if defined(__AVX512F__)
// R x NB >= 8 independent sums keep both FMA ports busy; for fewer, each sum takes two chains.
template <int R, int NB>
constexpr int kChains = R * NB >= 8 ? 1 : 2;

// The sums of R activation rows (row stride K) from input k on against NB weight rows' next 32 values in fp32:
// the first 16 in ``low``, the next 16 in ``high``.
template <int R, int NB>
inline void fma_rows(const float* x, int64_t K, int64_t k, const __m512 (&low)[NB], const __m512 (&high)[NB],
                     __m512 (&acc)[R][NB][kChains<R, NB>]) {
  constexpr int C = kChains<R, NB>;
  for (int r = 0; r < R; ++r) {
    const __m512 x0 = _mm512_loadu_ps(x + r * K + k), x1 = _mm512_loadu_ps(x + r * K + k + 16);
    for (int j = 0; j < NB; ++j) {
      acc[r][j][0] = _mm512_fmadd_ps(low[j], x0, acc[r][j][0]);
      acc[r][j][C - 1] = _mm512_fmadd_ps(high[j], x1, acc[r][j][C - 1]);
    }
  }
}

template <int C>
inline float total(const __m512 (&chains)[C]) {
  return _mm512_reduce_add_ps(C == 2 ? _mm512_add_ps(chains[0], chains[C - 1]) : chains[0]);
}
#endif

// out[r * ldo + j] = scale[j] * sum_k x[r, k] * w[j, k]: R rows of x (row stride K), NB int8 weight rows.
template <int R, int NB>
inline void int8_tile(const float* x, int64_t K, const int8_t* w, const float* scale, float* out, int64_t ldo) {
  float sums[R][NB] = {};
  int64_t k = 0;
#if defined(__AVX512F__)
  constexpr int C = kChains<R, NB>;
  __m512 acc[R][NB][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int c = 0; c < C; ++c) acc[r][j][c] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512 w0[NB], w1[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch((const char*)(w + (j + NB) * K + k), _MM_HINT_T0);  // the next tile's rows (why: above kGrain)
      w0[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + j * K + k))));
      w1[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + j * K + k + 16))));
    }
    fma_rows<R, NB>(x, K, k, w0, w1, acc);
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) sums[r][j] = total(acc[r][j]);
#else
  float chunk[NB][kChunk];
  float lanes[R][NB][kLanes] = {};
  for (; k + kChunk <= K; k += kChunk) {
    for (int j = 0; j < NB; ++j)
      for (int i = 0; i < kChunk; ++i) chunk[j][i] = static_cast<float>(w[j * K + k + i]);
    rows_dot_chunk<R, NB>(x + k, K, chunk, lanes);
  }
  add_lanes<R, NB>(lanes, sums);
#endif
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float sum = sums[r][j];
#pragma omp simd reduction(+ : sum)
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(w[j * K + t]) * x[r * K + t];
      out[r * ldo + j] = sum * scale[j];
    }
}

// int4: a weight row is blocks of 32 inputs in 16 bytes (byte j: input j in the low nibble, input j + 16
// in the high one), in groups of G inputs (G a multiple of 32) with w = q * scale + offset. The AVX-512
// tile looks each nibble up in a 16-entry table of the group's 16 weight values (one permute does the
// lookup and the conversion: it reads only an index's low 4 bits).
template <int R, int NB>
inline void int4_tile(const float* x, int64_t K, int64_t G, const uint8_t* w, const float* scale,
                      const float* offset, float* out, int64_t ldo) {
  const int64_t groups = K / G, row_bytes = K / 2;
#if defined(__AVX512F__)
  constexpr int C = kChains<R, NB>;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[R][NB][C];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j)
      for (int c = 0; c < C; ++c) acc[r][j][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 table[NB];
    for (int j = 0; j < NB; ++j)
      table[j] = _mm512_fmadd_ps(iota, _mm512_set1_ps(scale[j * groups + g]), _mm512_set1_ps(offset[j * groups + g]));
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m512 low[NB], high[NB];
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch((const char*)(w + (j + NB) * row_bytes + k / 2), _MM_HINT_T0);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + j * row_bytes + k / 2)));
        low[j] = _mm512_permutexvar_ps(bytes, table[j]);
        high[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table[j]);
      }
      fma_rows<R, NB>(x, K, k, low, high, acc);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) out[r * ldo + j] = total(acc[r][j]);
#else
  // Chunks of 32 inputs (one packed block): G is a multiple of 32, so a chunk lies in one group.
  float sums[R][NB] = {};
  float chunk[NB][kChunk];
  float lanes[R][NB][kLanes] = {};
  for (int64_t k = 0; k < K; k += kChunk) {
    for (int j = 0; j < NB; ++j) {
      const float s = scale[j * groups + k / G], o = offset[j * groups + k / G];
      const uint8_t* b = w + j * row_bytes + k / 2;
#pragma omp simd
      for (int i = 0; i < 16; ++i) {
        chunk[j][i] = static_cast<float>(b[i] & 15) * s + o;
        chunk[j][i + 16] = static_cast<float>(b[i] >> 4) * s + o;
      }
    }
    rows_dot_chunk<R, NB>(x + k, K, chunk, lanes);
  }
  add_lanes<R, NB>(lanes, sums);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) out[r * ldo + j] = sums[r][j];
#endif
}

// One thread's output features n0..n1 for R rows: tiles of NB weight rows, then single rows.
template <int R, int NB, typename Tile>
inline void by_tiles(int64_t n0, int64_t n1, Tile tile) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile(n, std::integral_constant<int, NB>{});
  for (; n < n1; ++n) tile(n, std::integral_constant<int, 1>{});
}

// Rows in blocks of 8 (3 weight rows a tile: 24 sums in registers), then 4, 2, 1 (4 weight rows a tile).
template <typename RowsTile>
inline void over_rows(int64_t M, int64_t n0, int64_t n1, RowsTile rows_tile) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) by_tiles<8, 3>(n0, n1, [&](int64_t n, auto nb) { rows_tile(m, n, std::integral_constant<int, 8>{}, nb); });
  for (; m + 4 <= M; m += 4) by_tiles<4, 4>(n0, n1, [&](int64_t n, auto nb) { rows_tile(m, n, std::integral_constant<int, 4>{}, nb); });
  for (; m + 2 <= M; m += 2) by_tiles<2, 4>(n0, n1, [&](int64_t n, auto nb) { rows_tile(m, n, std::integral_constant<int, 2>{}, nb); });
  for (; m < M; ++m) by_tiles<1, 4>(n0, n1, [&](int64_t n, auto nb) { rows_tile(m, n, std::integral_constant<int, 1>{}, nb); });
}


#if defined(AITUNE_AMX)
// AMX: the tile unit multiplies int8 by int8 into int32 sums, 1,024 products an instruction. The weights
// are its first operand as they lie (16 weight rows x 64 inputs, row stride K: no repacking, the same
// checkpoint); the activations its second: each row split in kPieces int8 pieces (cpu_amx.h), fp32's
// precision. A piece of a row is a column ("v-column") of the
// second operand, laid out as AMX wants (4 consecutive inputs of a column together); a tile of 16 v-columns
// holds 5 rows (15 columns, the 16th unused). One instruction then serves 5 rows, and a pass of up to 6
// such tiles reads the weights' 16 x 64 bytes once for 30 rows.
using aitune_amx::kPieces;
using aitune_amx::TileConfig;
constexpr int kRowsPerTile = 16 / kPieces;
constexpr int64_t kAmxK = 64;      // inputs a tile instruction takes
constexpr int64_t kAmxMaxK = 131072;  // int32 sums of 127 * 128 products stay exact up to 2^31 / 16256 inputs
constexpr int kInt8PassTiles = 6;  // v-column tiles a pass keeps: 6 sums + the weights + the activations = 8 tiles
constexpr int kInt4PassTiles = 3;  // int4: two sets of 3 sums (see int4's block) + weights + activations
constexpr int64_t kInt4AmxMinRows = 8;  // fewer rows: the AVX-512 tiles are faster (measured, int4 only)

// The tiles as int8 and int4 start from: 16 rows x 64 bytes each.
inline TileConfig full_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.set(t, 16, 64);
  return config;
}

// The activations as AMX's second operand: tile g, input quad q, column c: 4 int8 at ((g * quads + q) * 16 + c) * 4;
// and each column's weight (s / 254^piece) in mult[g * 16 + c]. Inputs from K_tiles on are not split (int8 sums
// them in fp32). A column no row uses is never read back: left as it was. Reused by a thread's calls (a
// 128-row prompt chunk's pieces are 1.7 MB: allocated once, not each call).
struct Pieces {
  std::vector<int8_t> bytes;
  std::vector<float> mult;
  int64_t tiles, quads;
};

inline const Pieces& split_rows(const float* x, int64_t M, int64_t K, int64_t K_tiles) {
  thread_local Pieces p;
  p.tiles = (M + kRowsPerTile - 1) / kRowsPerTile;
  p.quads = K_tiles / 4;
  if (p.bytes.size() < static_cast<size_t>(p.tiles * p.quads * 64)) p.bytes.resize(p.tiles * p.quads * 64);
  if (p.mult.size() < static_cast<size_t>(p.tiles * 16)) p.mult.resize(p.tiles * 16);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    const float s = aitune_amx::row_scale(row, K);
    const __m512 inverse = _mm512_set1_ps(1.f / s);
    const int64_t tile = m / kRowsPerTile;
    int32_t* column_at[kPieces];
    for (int piece = 0; piece < kPieces; ++piece) {
      const int64_t c = (m % kRowsPerTile) * kPieces + piece;
      p.mult[tile * 16 + c] = aitune_amx::piece_weight(s, piece);
      column_at[piece] = reinterpret_cast<int32_t*>(p.bytes.data() + (tile * p.quads * 16 + c) * 4);
    }
    for (int64_t k = 0; k < K_tiles; k += 16) {
      __m128i pieces[kPieces];
      aitune_amx::split16(_mm512_mul_ps(_mm512_loadu_ps(row + k), inverse), pieces);
      for (int piece = 0; piece < kPieces; ++piece) {
        alignas(16) int32_t quads[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(quads), pieces[piece]);
        for (int i = 0; i < 4; ++i) column_at[piece][(k / 4 + i) * 16] = quads[i];
      }
    }
  }
  return p;
}

// A 16 x 16 fp32 block in 16 registers, transposed in place: r[c][i] = r[i][c] on return.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], s[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto low = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const auto high = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {  // s[i + j], 128-bit lane L: rows i..i+3 of column 4L + j
    s[i] = low(t[i], t[i + 2]);
    s[i + 1] = high(t[i], t[i + 2]);
    s[i + 2] = low(t[i + 1], t[i + 3]);
    s[i + 3] = high(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 u = _mm512_shuffle_f32x4(s[j], s[4 + j], 0x44), v = _mm512_shuffle_f32x4(s[j], s[4 + j], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0x44);
    const __m512 v2 = _mm512_shuffle_f32x4(s[8 + j], s[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(u, u2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(u, u2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(v, v2, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v, v2, 0xDD);
  }
}

inline __m512 load_floats(const int32_t* sums) { return _mm512_cvtepi32_ps(_mm512_load_si512(sums)); }
inline __m512 load_floats(const float* sums) { return _mm512_load_ps(sums); }

// A pass's sums ([tiles][16 weight rows][16 columns], int32 or fp32, from tile first_tile on) turned into each
// row's sums against the 16 weight rows: columns weighed by their piece's weight, transposed to columns, and a
// row's pieces added. emit(m, vector over the 16 weight rows) for rows m < M.
template <typename Sums, typename Emit>
inline void row_sums(const Pieces& p, int64_t first_tile, int tiles, int64_t M, const Sums* sums, Emit emit) {
  for (int t = 0; t < tiles; ++t) {
    const int64_t tile = first_tile + t;
    const __m512 mult = _mm512_loadu_ps(p.mult.data() + tile * 16);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(load_floats(sums + (t * 16 + i) * 16), mult);
    transpose16(r);
    for (int row = 0; row < kRowsPerTile && tile * kRowsPerTile + row < M; ++row) {
      __m512 sum = r[row * kPieces];
      for (int piece = 1; piece < kPieces; ++piece) sum = _mm512_add_ps(sum, r[row * kPieces + piece]);
      emit(tile * kRowsPerTile + row, sum);
    }
  }
}

// Tile numbers are part of the instructions: these spell a pass's tiles out. (g, tile): v-column tile g's sums.
#define AITUNE_AMX_INT8_TILES(do_) do_(0, 2) do_(1, 3) do_(2, 4) do_(3, 5) do_(4, 6) do_(5, 7)
#define AITUNE_AMX_ZERO(g, tile) if constexpr (T > g) _tile_zero(tile);
#define AITUNE_AMX_STORE(g, tile) if constexpr (T > g) _tile_stored(tile, sums + g * 256, 64);
#define AITUNE_AMX_PRODUCT(g, tile) \
  if constexpr (T > g) { _tile_loadd(1, b + g * tile_bytes + k * 16, 64); _tile_dpbssd(tile, 0, 1); }

// int8: sums[T][16][16] of 16 weight rows (row stride ldw, tile 0) against T v-column tiles (tile 1 in turn).
template <int T>
inline void int8_block(const int8_t* w, int64_t ldw, int64_t K_tiles, const int8_t* b, int64_t tile_bytes,
                       int32_t* sums) {
  AITUNE_AMX_INT8_TILES(AITUNE_AMX_ZERO)
  for (int64_t k = 0; k < K_tiles; k += kAmxK) {
    for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (16 + i) * ldw + k), _MM_HINT_T0);
    _tile_loadd(0, w + k, ldw);
    AITUNE_AMX_INT8_TILES(AITUNE_AMX_PRODUCT)
  }
  AITUNE_AMX_INT8_TILES(AITUNE_AMX_STORE)
}

// A thread's blocks of 16 weight rows, each in passes of up to kInt8PassTiles row tiles. A pass's sums are
// turned into outputs after the next pass's products: reading them right after the tile store would wait for it.
inline void int8_amx(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, float* out,
                     int64_t N, int64_t n0, int64_t n1, const Pieces& p) {
  const int64_t K_tiles = K / kAmxK * kAmxK, tile_bytes = p.quads * 64;
  TileConfig config = full_tiles();
  _tile_loadconfig(&config);
  alignas(64) int32_t sums[2][kInt8PassTiles * 256];
  struct Pass { int64_t n, t0; int tiles; };
  Pass last{0, 0, 0};
  const auto finish = [&](const Pass& pass, const int32_t* pass_sums) {
    const int64_t n = pass.n;
    row_sums(p, pass.t0, pass.tiles, M, pass_sums, [&](int64_t m, __m512 sum) {
      if (K_tiles < K) {  // inputs past the last whole tile: in fp32
        alignas(64) float tail[16];
        for (int i = 0; i < 16; ++i) {
          tail[i] = 0.f;
          for (int64_t t = K_tiles; t < K; ++t) tail[i] += static_cast<float>(w[(n + i) * K + t]) * x[m * K + t];
        }
        sum = _mm512_add_ps(sum, _mm512_load_ps(tail));
      }
      _mm512_storeu_ps(out + m * N + n, _mm512_mul_ps(sum, _mm512_loadu_ps(scale + n)));
    });
  };
  int parity = 0;
  for (int64_t n = n0; n < n1; n += 16) {
    for (int64_t t0 = 0; t0 < p.tiles; t0 += kInt8PassTiles, parity ^= 1) {
      const int tiles = static_cast<int>(std::min<int64_t>(kInt8PassTiles, p.tiles - t0));
      const int8_t* b = p.bytes.data() + t0 * tile_bytes;
      int32_t* pass_sums = sums[parity];
      switch (tiles) {
        case 1: int8_block<1>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
        case 2: int8_block<2>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
        case 3: int8_block<3>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
        case 4: int8_block<4>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
        case 5: int8_block<5>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
        default: int8_block<6>(w + n * K, K, K_tiles, b, tile_bytes, pass_sums); break;
      }
      if (last.tiles) finish(last, sums[parity ^ 1]);
      last = {n, t0, tiles};
    }
  }
  if (last.tiles) finish(last, sums[parity ^ 1]);
  _tile_release();
}

// int4: each step unpacks 16 weight rows' next `step` inputs (step = min(G, 64)) to int8 0..15 (tile 0), and
// a group's int32 sums are scaled into fp32 sums when the group ends: with w = q * scale + offset,
// sum_k x w = sum_groups scale * (sum x q) + offset * (sum x), the second from x in fp32 (x_sums). Groups
// alternate between two sets of sum tiles (2..4, 5..7) and two buffers: a group's sums are stored while the
// next group's products run, and scaled one group later, so no step waits for a store to land.
#define AITUNE_AMX_INT4_EVEN(do_) do_(0, 2) do_(1, 3) do_(2, 4)
#define AITUNE_AMX_INT4_ODD(do_) do_(0, 5) do_(1, 6) do_(2, 7)

template <int T>
inline void scale_group(const int32_t* sums, const float* scale, int64_t groups_k, int64_t group, float* acc) {
  for (int g = 0; g < T; ++g)
    for (int i = 0; i < 16; ++i) {
      const __m512 s = _mm512_set1_ps(scale[i * groups_k + group]);
      float* a = acc + (g * 16 + i) * 16;
      _mm512_store_ps(a, _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_load_si512(sums + (g * 16 + i) * 16)),
                                         _mm512_load_ps(a)));
    }
}

template <int T>
inline void int4_block(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t group_size, int64_t step,
                       const float* scale, const int8_t* b, int64_t tile_bytes, float* acc) {
  alignas(64) int8_t unpacked[16][64];
  alignas(64) int32_t stored[2][kInt4PassTiles * 256];
  const int64_t groups_k = K / group_size;
  const __m256i low_nibbles = _mm256_set1_epi8(15);
  std::fill(acc, acc + T * 256, 0.f);
  for (int64_t group = 0; group < groups_k; ++group) {
    const bool odd = group & 1;
    int32_t* sums = stored[odd];
    if (odd) { AITUNE_AMX_INT4_ODD(AITUNE_AMX_ZERO) } else { AITUNE_AMX_INT4_EVEN(AITUNE_AMX_ZERO) }
    for (int64_t k = group * group_size; k < (group + 1) * group_size; k += step) {
      for (int i = 0; i < 16; ++i) {
        const uint8_t* src = w + i * row_bytes + k / 2;
        _mm_prefetch(reinterpret_cast<const char*>(src + 16 * row_bytes), _MM_HINT_T0);  // the next block's row
        if (step == 64) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
          const __m256i low = _mm256_and_si256(bytes, low_nibbles);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
          _mm256_store_si256(reinterpret_cast<__m256i*>(unpacked[i]), _mm256_permute2x128_si256(low, high, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(unpacked[i] + 32), _mm256_permute2x128_si256(low, high, 0x31));
        } else {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
          const __m128i low_nibbles_128 = _mm256_castsi256_si128(low_nibbles);
          _mm_store_si128(reinterpret_cast<__m128i*>(unpacked[i]), _mm_and_si128(bytes, low_nibbles_128));
          _mm_store_si128(reinterpret_cast<__m128i*>(unpacked[i] + 16),
                          _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles_128));
        }
      }
      _tile_loadd(0, unpacked, 64);
      if (odd) { AITUNE_AMX_INT4_ODD(AITUNE_AMX_PRODUCT) } else { AITUNE_AMX_INT4_EVEN(AITUNE_AMX_PRODUCT) }
    }
    if (odd) { AITUNE_AMX_INT4_ODD(AITUNE_AMX_STORE) } else { AITUNE_AMX_INT4_EVEN(AITUNE_AMX_STORE) }
    if (group > 0) scale_group<T>(stored[!odd], scale, groups_k, group - 1, acc);
  }
  scale_group<T>(stored[(groups_k - 1) & 1], scale, groups_k, groups_k - 1, acc);
}

inline void int4_amx(const float* offset_sums, int64_t M, int64_t K, int64_t group_size, const uint8_t* w,
                     const float* scale, float* out, int64_t N, int64_t n0, int64_t n1,
                     const Pieces& p) {
  const int64_t groups_k = K / group_size, step = std::min<int64_t>(group_size, kAmxK), tile_bytes = p.quads * 64;
  TileConfig config = full_tiles();
  config.set(0, 16, static_cast<int>(step));  // 16 weight rows x step inputs
  config.set(1, static_cast<int>(step / 4), 64);  // step / 4 input quads x 16 v-columns
  _tile_loadconfig(&config);
  alignas(64) float acc[kInt4PassTiles * 256];
  for (int64_t n = n0; n < n1; n += 16) {
    for (int64_t t0 = 0; t0 < p.tiles; t0 += kInt4PassTiles) {
      const int tiles = static_cast<int>(std::min<int64_t>(kInt4PassTiles, p.tiles - t0));
      const uint8_t* rows = w + n * (K / 2);
      const int8_t* b = p.bytes.data() + t0 * tile_bytes;
      switch (tiles) {
        case 1: int4_block<1>(rows, K / 2, K, group_size, step, scale + n * groups_k, b, tile_bytes, acc); break;
        case 2: int4_block<2>(rows, K / 2, K, group_size, step, scale + n * groups_k, b, tile_bytes, acc); break;
        default: int4_block<3>(rows, K / 2, K, group_size, step, scale + n * groups_k, b, tile_bytes, acc); break;
      }
      row_sums(p, t0, tiles, M, acc, [&](int64_t m, __m512 sum) {
        _mm512_storeu_ps(out + m * N + n, _mm512_add_ps(sum, _mm512_loadu_ps(offset_sums + m * N + n)));
      });
    }
  }
  _tile_release();
}
#endif

}  // namespace

namespace aitune {

void int8_mm(const float* xp, int64_t M, int64_t K, const int8_t* wp, const float* sp, int64_t N, float* op) {
  int64_t n_amx = 0;
#if defined(AITUNE_AMX)
  if (M > 0 && K >= kAmxK && K <= kAmxMaxK && N >= 16 && aitune_amx::usable()) {
    n_amx = N / 16 * 16;
    const Pieces& pieces = split_rows(xp, M, K, K / kAmxK * kAmxK);
    at::parallel_for(0, n_amx / 16, kGrain / 16, [&](int64_t b0, int64_t b1) {
      int8_amx(xp, M, K, wp, sp, op, N, b0 * 16, b1 * 16, pieces);
    });
  }
#endif
  at::parallel_for(n_amx, N, kGrain, [&](int64_t n0, int64_t n1) {
    over_rows(M, n0, n1, [&](int64_t m, int64_t n, auto rows, auto nb) {
      int8_tile<decltype(rows)::value, decltype(nb)::value>(xp + m * K, K, wp + n * K, sp + n, op + m * N + n, N);
    });
  });
}

void int4_mm(const float* xp, int64_t M, int64_t K, const uint8_t* wp, const float* sp, const float* offp,
             int64_t group_size, int64_t N, float* op) {
  const int64_t groups = K / group_size;
  int64_t n_amx = 0;
#if defined(AITUNE_AMX)
  // AMX steps take min(G, 64) inputs and must not cross a group: G = 32 or a multiple of 64.
  if (M >= kInt4AmxMinRows && N >= 16 && K <= kAmxMaxK && (group_size == 32 || group_size % kAmxK == 0) &&
      aitune_amx::usable()) {
    n_amx = N / 16 * 16;
    const Pieces& pieces = split_rows(xp, M, K, K);
    // The offsets' share, sum_groups offset * (sum of x over the group), in fp32: [M, N].
    std::vector<float> x_sums(M * groups), offset_sums(M * N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        double sum = 0.;  // a group's sum within fp32's rounding, whatever its length
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += xp[m * K + k];
        x_sums[m * groups + g] = static_cast<float>(sum);
      }
    matmul(x_sums.data(), M, groups, offp, N, /*b_transposed=*/true, offset_sums.data());
    at::parallel_for(0, n_amx / 16, kGrain / 16, [&](int64_t b0, int64_t b1) {
      int4_amx(offset_sums.data(), M, K, group_size, wp, sp, op, N, b0 * 16, b1 * 16, pieces);
    });
  }
#endif
  at::parallel_for(n_amx, N, kGrain, [&](int64_t n0, int64_t n1) {
    over_rows(M, n0, n1, [&](int64_t m, int64_t n, auto rows, auto nb) {
      int4_tile<decltype(rows)::value, decltype(nb)::value>(xp + m * K, K, group_size, wp + n * (K / 2),
                                                            sp + n * groups, offp + n * groups, op + m * N + n, N);
    });
  });
}

bool amx_usable() {
#if defined(AITUNE_AMX)
  return aitune_amx::usable();
#else
  return false;
#endif
}

const char* tiles() {
#if defined(AITUNE_AMX)
  if (aitune_amx::usable()) return "AMX int8 tiles: int8 at any rows, int4 from 8 rows; AVX-512 tiles for the rest";
  return "AVX-512 tiles (built with AMX, but the OS did not grant the tile state)";
#elif defined(__AVX512F__)
  return "AVX-512 tiles";
#else
  return "portable tiles (no AVX-512)";
#endif
}

// Measured, 1024 x 1024 to 4096 x 4096 weights: on AMX ~2.3x a dequantize-then-matmul at 512 rows (even at ~1024);
// the AVX-512 tiles fall behind fp32's GEMM past ~128-256.
int64_t max_rows() {
#if defined(AITUNE_AMX)
  if (aitune_amx::usable()) return 512;
#endif
  return 128;
}

}  // namespace aitune

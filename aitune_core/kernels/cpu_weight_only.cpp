// Weight-only int8 and int4 matrix products for a few rows (decode steps, one-text requests) on CPUs.
// A product of few rows is bound by reading the weights, then by the instructions that turn them into
// fp32. So the work is cut into tiles of R activation rows x NB weight rows: each weight vector is
// converted once for R rows, each activation vector loaded once for NB weight rows, and the R x NB sums
// stay in registers across K. Built for the CPU that runs it (-march=native, build.py): AVX-512 tiles in
// intrinsics; elsewhere
// tiles that convert a chunk of weights once and leave the dot products to the compiler.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <immintrin.h>

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

}  // namespace

// x fp32 [M, K], weight int8 [N, K], scale fp32 [N] -> fp32 [M, N].
torch::Tensor int8_weight_only_mm(torch::Tensor x, torch::Tensor weight, torch::Tensor scale) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    over_rows(M, n0, n1, [&](int64_t m, int64_t n, auto rows, auto nb) {
      int8_tile<decltype(rows)::value, decltype(nb)::value>(xp + m * K, K, wp + n * K, sp + n, op + m * N + n, N);
    });
  });
  return out;
}

// x fp32 [M, K], packed uint8 [N, K / 2], scale and offset fp32 [N, K / G] -> fp32 [M, N].
torch::Tensor int4_weight_only_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                                  int64_t group_size) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / group_size;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* offp = offset.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    over_rows(M, n0, n1, [&](int64_t m, int64_t n, auto rows, auto nb) {
      int4_tile<decltype(rows)::value, decltype(nb)::value>(xp + m * K, K, group_size, wp + n * (K / 2),
                                                            sp + n * groups, offp + n * groups, op + m * N + n, N);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_weight_only_mm", &int8_weight_only_mm);
  m.def("int4_weight_only_mm", &int4_weight_only_mm);
}

// Weight-only int8 and int4 matrix products for a few rows (decode steps, one-text requests) on CPUs.
// A product of few rows is bound by reading the weights: each weight row is read from memory once
// and kept in L1 while every block of 8 (then 4) activation rows uses it. Built for the CPU that runs it
// (-march=native, build.py): AVX-512 and AVX2 paths in intrinsics, plain loops elsewhere.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <immintrin.h>

namespace {

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

constexpr int kRowBlock = 8;  // activation rows that share one read of a weight row (then 4, then 1)
constexpr int64_t kGrain = 64;  // output features a thread takes at a time

// acc[r] = sum_k x[r, k] * w[k] for R rows of x (row stride K), w one int8 weight row.
template <int R>
inline void int8_rows(const float* x, int64_t K, const int8_t* w, float* acc) {
  int64_t k = 0;
  float sums[R] = {};
#if defined(__AVX512F__)
  // Two accumulators a row: one FMA chain alone would wait on its own latency.
  __m512 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + k), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + k + 16), a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
#elif defined(__AVX2__)
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8))));
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(_mm256_add_ps(a[r][0], a[r][1]));
#endif
  for (int r = 0; r < R; ++r) {
    float sum = sums[r];
    for (int64_t t = k; t < K; ++t) sum += static_cast<float>(w[t]) * x[r * K + t];
    acc[r] = sum;
  }
}

// int4: a weight row is blocks of 32 inputs in 16 bytes (byte j: input j in the low nibble, input j + 16
// in the high one), in groups of G inputs (G a multiple of 32) with w = q * scale + offset. So
// sum_k x w = sum_g scale_g * sum_{k in g} x q + offset_g * sum_{k in g} x, the last from xsum.
template <int R>
inline void int4_rows(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w,
                      const float* scale, const float* offset, float* acc) {
  const int64_t groups = K / G;
  float shift[R] = {};
  float sums[R] = {};
#if defined(__AVX512F__)
  const __m512i low_nibble = _mm512_set1_epi32(15);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 32) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + k0 / 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      for (int r = 0; r < R; ++r) {
        a[r][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + r * K + k0), a[r][0]);
        a[r][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + r * K + k0 + 16), a[r][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_fmadd_ps(s, _mm512_add_ps(a[r][0], a[r][1]), total[r]);
      shift[r] += offset[g] * xsum[r * groups + g];
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(total[r]);
#else
  for (int64_t g = 0; g < groups; ++g) {
    float a[R] = {};
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 32) {
      const uint8_t* b = w + k0 / 2;
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + k0;
        float part = 0.f;
#pragma omp simd reduction(+ : part)
        for (int j = 0; j < 16; ++j) part += static_cast<float>(b[j] & 15) * xr[j] + static_cast<float>(b[j] >> 4) * xr[j + 16];
        a[r] += part;
      }
    }
    for (int r = 0; r < R; ++r) {
      sums[r] += scale[g] * a[r];
      shift[r] += offset[g] * xsum[r * groups + g];
    }
  }
#endif
  for (int r = 0; r < R; ++r) acc[r] = sums[r] + shift[r];
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
    float acc[kRowBlock];
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wr = wp + n * K;
      int64_t m = 0;
      for (; m + kRowBlock <= M; m += kRowBlock) {
        int8_rows<kRowBlock>(xp + m * K, K, wr, acc);
        for (int r = 0; r < kRowBlock; ++r) op[(m + r) * N + n] = acc[r] * sp[n];
      }
      for (; m + 4 <= M; m += 4) {
        int8_rows<4>(xp + m * K, K, wr, acc);
        for (int r = 0; r < 4; ++r) op[(m + r) * N + n] = acc[r] * sp[n];
      }
      for (; m < M; ++m) {
        int8_rows<1>(xp + m * K, K, wr, acc);
        op[m * N + n] = acc[0] * sp[n];
      }
    }
  });
  return out;
}

// x fp32 [M, K], packed uint8 [N, K / 2], scale and offset fp32 [N, K / G] -> fp32 [M, N].
torch::Tensor int4_weight_only_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                                  int64_t group_size) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), groups = K / group_size;
  auto xsum = x.view({M, groups, group_size}).sum(-1).contiguous();
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* offp = offset.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    float acc[kRowBlock];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = wp + n * (K / 2);
      const float* sn = sp + n * groups;
      const float* on = offp + n * groups;
      int64_t m = 0;
      for (; m + kRowBlock <= M; m += kRowBlock) {
        int4_rows<kRowBlock>(xp + m * K, xs + m * groups, K, group_size, wr, sn, on, acc);
        for (int r = 0; r < kRowBlock; ++r) op[(m + r) * N + n] = acc[r];
      }
      for (; m + 4 <= M; m += 4) {
        int4_rows<4>(xp + m * K, xs + m * groups, K, group_size, wr, sn, on, acc);
        for (int r = 0; r < 4; ++r) op[(m + r) * N + n] = acc[r];
      }
      for (; m < M; ++m) {
        int4_rows<1>(xp + m * K, xs + m * groups, K, group_size, wr, sn, on, acc);
        op[m * N + n] = acc[0];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_weight_only_mm", &int8_weight_only_mm);
  m.def("int4_weight_only_mm", &int4_weight_only_mm);
}

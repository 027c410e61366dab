// Attention over a static KV cache, read where it lies. Each query (a decode step, a prompt token riding in a
// decode step, a prompt chunk's token) attends to its own slot's cached positions up to its own position. Done in torch, that
// is a gather of every row's window out of the cache (a copy the length of the longest sequence for every
// row), a masked score matrix and two batched products: at 8 decode rows of a 254M decoder that costs more
// than the rest of the step but its products. Here each (row, kv head) reads its keys and values once, only
// as far as its own position, for the query heads that share them. The cache holds fp32 or bf16 (half the bytes a
// step reads, widened to fp32 as they are read; the sums stay fp32).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// A cache element as fp32: bf16 is fp32's upper half.
inline float widen(float x) { return x; }
inline float widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// exp(x) for the x <= 0 of a softmax, within ~1 ulp (Cephes' expf), in plain float arithmetic so that the
// compiler vectorizes a loop of it (std::exp is called one value at a time). A NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float rounder = 12582912.f;  // 1.5 * 2^23: adding and taking it away rounds to an integer
  const float n = (x * 1.44269504088896341f + rounder) - rounder;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const float whole = n == n ? n : 0.f;  // a NaN x keeps NaN through p; the exponent's bits need a number
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

constexpr int64_t kAhead = 8;  // key rows prefetched ahead of the one read

// A prefetch is a hint (the callers keep it within the rows they read: no pointer past the cache).
template <typename Cache>
inline void prefetch_row(const Cache* row, int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(Cache);  // elements a cache line
  for (int64_t i = 0; i < D; i += kLine) __builtin_prefetch(row + i);
}

// Softmax of ``row``'s first ``count`` scores times ``scale``; the rest of its ``width`` (positions past the query's
// own) get 0.
void softmax_prefix(float* row, int64_t count, int64_t width, float scale) {
  float top = row[0] * scale;
  for (int64_t c = 0; c < count; ++c) {
    row[c] *= scale;
    top = row[c] > top ? row[c] : top;
  }
  if (std::isnan(top)) top = 0.f;  // a NaN score must spread, not be taken away from itself as NaN - NaN
  float total = 0.f;
  for (int64_t c = 0; c < count; ++c) {
    row[c] = exp_nonpositive(row[c] - top);
    total += row[c];
  }
  const float inverse = 1.f / total;
  for (int64_t c = 0; c < count; ++c) row[c] *= inverse;
  for (int64_t c = count; c < width; ++c) row[c] = 0.f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 elements of a row (the lanes ``m`` holds; the others 0, never read) as fp32.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// The lanes of a row of D from element d on (none past its end).
inline __mmask16 lanes_from(int64_t d, int64_t D) {
  return d >= D ? 0 : D - d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (D - d)) - 1);
}

// The dot products of the G query rows with N keys from ``keys``, into ``scores`` (G rows of ``count``): one
// vector of sums per key, so N dot products run side by side rather than each waiting on its own sums.
template <int N, typename Cache>
inline void dot_keys_n(const float* q, int64_t G, int64_t D, const Cache* keys, int64_t count, float* scores) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 sum[N];
    for (int n = 0; n < N; ++n) sum[n] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = lanes_from(d, D);
      const __m512 query = load16(q + g * D + d, m);
      for (int n = 0; n < N; ++n) sum[n] = _mm512_fmadd_ps(query, load16(keys + n * D + d, m), sum[n]);
    }
    for (int n = 0; n < N; ++n) scores[g * count + n] = _mm512_reduce_add_ps(sum[n]);
  }
}

constexpr int kKeysAtOnce = 4;

template <typename Cache>
void dot_keys(const float* q, int64_t G, int64_t D, const Cache* keys, const Cache* values, int64_t count,
              float* scores) {
  int64_t c = 0;
  for (; c + kKeysAtOnce <= count; c += kKeysAtOnce) {
    for (int n = 0; n < kKeysAtOnce; ++n) {
      prefetch_row(keys + std::min(c + n + kAhead, count - 1) * D, D);
      prefetch_row(values + (c + n) * D, D);
    }
    dot_keys_n<kKeysAtOnce>(q, G, D, keys + c * D, count, scores + c);
  }
  for (; c < count; ++c) {
    prefetch_row(values + c * D, D);
    dot_keys_n<1>(q, G, D, keys + c * D, count, scores + c);
  }
}

// out (G x D) = each query row's weights ``scores`` (G rows of ``count``) times the values: 64 columns of sums at a
// time, in registers.
template <typename Cache>
void sum_values(const float* scores, int64_t G, int64_t D, const Cache* values, int64_t count, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* weight = scores + g * count;
    for (int64_t d = 0; d < D; d += 64) {
      const __mmask16 m[4] = {lanes_from(d, D), lanes_from(d + 16, D), lanes_from(d + 32, D), lanes_from(d + 48, D)};
      __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t c = 0; c < count; ++c) {
        const __m512 w = _mm512_set1_ps(weight[c]);
        const Cache* v = values + c * D + d;
        for (int i = 0; i < 4; ++i)
          if (m[i]) sum[i] = _mm512_fmadd_ps(w, load16(v + 16 * i, m[i]), sum[i]);
      }
      for (int i = 0; i < 4; ++i)
        if (m[i]) _mm512_mask_storeu_ps(out + g * D + d + 16 * i, m[i], sum[i]);
    }
  }
}
#else
constexpr int kLanes = 16;  // partial sums of a dot product, added up once: the compiler keeps them in registers

template <typename Cache>
inline float dot(const float* a, const Cache* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * widen(b[i + l]);
  for (; i < n; ++i) lanes[i % kLanes] += a[i] * widen(b[i]);
  // Halves added pairwise: vector adds, where a sum lane after lane is sixteen dependent scalar ones.
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

template <typename Cache>
void dot_keys(const float* q, int64_t G, int64_t D, const Cache* keys, const Cache* values, int64_t count,
              float* scores) {
  for (int64_t c = 0; c < count; ++c) {
    prefetch_row(keys + std::min(c + kAhead, count - 1) * D, D);
    prefetch_row(values + c * D, D);
    for (int64_t g = 0; g < G; ++g) scores[g * count + c] = dot(q + g * D, keys + c * D, D);
  }
}

template <typename Cache>
void sum_values(const float* scores, int64_t G, int64_t D, const Cache* values, int64_t count,
                float* __restrict out) {
  std::fill(out, out + G * D, 0.f);
  for (int64_t c = 0; c < count; ++c) {
    const Cache* v = values + c * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * count + c];
      float* __restrict sum = out + g * D;
      for (int64_t d = 0; d < D; ++d) sum[d] += p * widen(v[d]);
    }
  }
}
#endif

// A decode row's G query heads ``q`` (G x D) over ``count`` cached keys and values (count x D each) -> ``out``
// (G x D): a few query rows are bound by reading the keys and values, which this does once (the keys' pass
// prefetches the values for the second). ``scores`` is the caller's scratch.
template <typename Cache>
void attend_few(const float* q, int64_t G, int64_t D, const Cache* keys, const Cache* values, int64_t count,
                float scale, float* out, std::vector<float>& scores) {
  scores.resize(G * count);
  dot_keys(q, G, D, keys, values, count, scores.data());
  for (int64_t g = 0; g < G; ++g) softmax_prefix(scores.data() + g * count, count, count, scale);
  sum_values(scores.data(), G, D, values, count, out);
}

// The L x G query rows of one kv head (a prompt chunk: L tokens at ``positions``; q and out rows of H heads, this
// head's G from ``head``) over the keys and values where they lie, in two matrix products: many query rows are
// bound by the multiplications, which a GEMM does best (bf16 keys and values are widened first: the GEMM is fp32).
template <typename Cache>
void attend_many(const float* q, int64_t L, int64_t H, int64_t G, int64_t D, int64_t head, const int64_t* positions,
                 const Cache* keys, const Cache* values, float scale, float* out) {
  int64_t count = 0;
  for (int64_t t = 0; t < L; ++t) count = std::max(count, positions[t] + 1);
  thread_local std::vector<float> queries, scores, sums, widened;
  queries.resize(L * G * D);
  scores.resize(L * G * count);
  sums.resize(L * G * D);
  for (int64_t t = 0; t < L; ++t)
    std::memcpy(queries.data() + t * G * D, q + (t * H + head) * D, G * D * sizeof(float));
  const float* k = reinterpret_cast<const float*>(keys);
  const float* v = reinterpret_cast<const float*>(values);
  if constexpr (!std::is_same_v<Cache, float>) {
    widened.resize(2 * count * D);
    for (int64_t i = 0; i < count * D; ++i) {
      widened[i] = widen(keys[i]);
      widened[count * D + i] = widen(values[i]);
    }
    k = widened.data();
    v = widened.data() + count * D;
  }
  aitune::matmul(queries.data(), L * G, D, k, count, /*b_transposed=*/true, scores.data());
  float* s = scores.data();
  for (int64_t t = 0; t < L; ++t)
    for (int64_t g = 0; g < G; ++g) softmax_prefix(s + (t * G + g) * count, positions[t] + 1, count, scale);
  aitune::matmul(scores.data(), L * G, count, v, D, /*b_transposed=*/false, sums.data());
  for (int64_t t = 0; t < L; ++t) std::memcpy(out + (t * H + head) * D, sums.data() + t * G * D, G * D * sizeof(float));
}

constexpr int64_t kGemmRows = 16;  // query rows of one kv head from which two GEMMs beat the loops (L x G)

// Every (row, token, kv head) of q over its slot's cache (of ``Cache``: float, or bf16 as its bits), into ``out``.
template <typename Cache>
void attend(const aitune::AttentionShape& shape, const float* qp, const Cache* kp, const Cache* vp,
            const int64_t* slot, const int64_t* position, float* op) {
  const int64_t B = shape.B, L = shape.L, H = shape.H, D = shape.D, KV = shape.KV, C = shape.C;
  const int64_t G = H / KV;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (L * G >= kGemmRows) {
    // One task a (row, kv head): its L tokens' G query heads in two GEMMs.
    at::parallel_for(0, B * KV, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i % KV, b = i / KV;
        const int64_t cache_row = (slot[b] * KV + h) * C * D;
        attend_many(qp + b * L * H * D, L, H, G, D, h * G, position + b * L, kp + cache_row, vp + cache_row, scale,
                    op + b * L * H * D);
      }
    });
    return;
  }
  // One task a (row, token, kv head): its G query heads read that head's keys and values once.
  at::parallel_for(0, B * L * KV, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i % KV, bt = i / KV, b = bt / L;
      const int64_t cache_row = (slot[b] * KV + h) * C * D;
      const int64_t head = (bt * H + h * G) * D;
      attend_few(qp + head, G, D, kp + cache_row, vp + cache_row, position[bt] + 1, scale, op + head, scores);
    }
  });
}

}  // namespace

namespace aitune {

void cached_attention(const AttentionShape& shape, const float* q, const void* k_cache, const void* v_cache,
                      bool bf16_cache, const int64_t* slot, const int64_t* position, float* out) {
  if (bf16_cache)
    attend<uint16_t>(shape, q, static_cast<const uint16_t*>(k_cache), static_cast<const uint16_t*>(v_cache), slot,
                     position, out);
  else
    attend<float>(shape, q, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), slot, position,
                  out);
}

}  // namespace aitune

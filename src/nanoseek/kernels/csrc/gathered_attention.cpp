// DSA's gathered attention on the CPU: softmax over each query's picked keys, read where they lie.
//
// One "row" is a (batch, query, key head) triple: its R query heads (R, X), its K picks into the key
// head's S rows, and whether each pick counts. q (B, H, T, X) and the output's gradient are read
// through their strides (a block's rows copied into the row layout the loops read, so no caller
// makes a transposed copy); out and dq come back (B, H, T, .), out stored (B, T, H, V) where q's heads
// lie inside a query, dq with q's strides where q is dense. Forward, per row, in tiles of at most TILE
// picks (a segment's at a time, below):
//     s_{r,j} = scale * q_r . k_{idx_j}                         (invalid picks: -inf)
//     m_r <- max(m_r, max_j s_{r,j});  l_r and o_r rescaled by exp(m_old - m_r)   (online softmax)
//     o_r += sum_j exp(s_{r,j} - m_r) v_{idx_j},   l_r += sum_j exp(s_{r,j} - m_r)
// then o_r /= l_r and lse_r = m_r + log l_r. With sinks (one logit s_h per query head, V4's), each
// row-head starts from its sink instead of from nothing: m_r = s_h, l_r = 1, o_r = 0 (a key of logit
// s_h whose value is zero), so lse counts it; backward needs nothing more (p = exp(s - lse) already
// carries it; the sinks' own gradient, -sum_t exp(s_h - lse_t) D_t, is the caller's, from the D it
// returns). A tile's picked rows are read from the key matrix in place (no gathered copy) for the
// scores and read again, from cache, for the values. Backward,
// flash-style from lse (no probabilities kept), per tile:
//     p = exp(s - lse),  dp = dO_r . v_j,  ds = scale p (dp - D_r),  D_r = dO_r . o_r
//     dq_r += sum_j ds_{r,j} k_j,   dk_j += sum_r ds_{r,j} q_r,   dv_j += sum_r p_{r,j} dO_r
// The values are their own matrix or the keys' first V columns (MLA's absorbed form: dv_j then lands
// in dk_j's first V columns, and the two sums over heads go in one pass, 2R heads deep). Three
// register-blocked loops do all the work (`scores`, `mix_rows`, `mix_heads`: GCC vector types, 8
// floats, fused multiply-adds); the softmax's exponentials
// are 8 at a time (`exp8`, AVX2: glibc's scalar expf was a fifth of the forward), and the first pass
// over a tile's picks fetches the next rows ahead (`scores_block`'s `ahead`). Blocks of rows run in
// parallel over torch's intra-op threads; in backward each thread adds into its own dk (and dv), summed last
// (memory: one key-sized gradient per thread). Rows go in blocks that walk the keys a segment at a
// time (`Segments`, below): a segment's key rows are read from memory once per block, not once per
// row that picked them. A pick outside the key head's rows is an error.
// q, k, v (and dO) come as fp32, or as bf16 where the library is built for AVX-512 BF16 (the
// NANOSEEK_BF16 loops below, each by vdpbf16ps); out, lse and the gradients are fp32 either way.
// Registered as torch ops (nanoseek::gathered_attention and its backward), so dispatch modes such as
// the FLOP counter see them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define NANOSEEK_BF16 1  // bf16 inputs too (below)
#endif

namespace {

constexpr int64_t TILE = 64;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
// a broadcast (vbroadcastss from memory); `v8{} + a` cost an add and a shuffle per weight (0 + a is
// not a no-op for a = -0 without fast math)
inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }
inline float hsum(v8 v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// out[0..3] = the sums of a, b, c, d: three horizontal adds and one of the halves (the accumulators'
// reduction, one at a time, was ~a fifth of a scores block at 512 columns)
inline void hsum4(v8 a, v8 b, v8 c, v8 d, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(__m256(a), __m256(b)), _mm256_hadd_ps(__m256(c), __m256(d)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
#endif
}

// c[r * TILE + j] = m_r . rows[j] over n columns, r < nr, j < nj; m_r = m + r * m_stride.
// Blocks of 3 rows x 4 heads: 12 accumulators, 7 loads per 12 multiply-adds (~5% faster than 4 x 2 at
// 8 heads of 512).
// `ahead` (NA rows, or none): rows the next block reads, fetched into the cache a line each per 16
// columns, so their misses overlap this block's work (picked rows lie anywhere in the keys).
template <int NJ, int NR, int NA = 0>
inline void scores_block(const float* const* rows, const float* m, int64_t m_stride, int64_t n, float* c,
                         const float* const* ahead = nullptr) {
  v8 acc[NR][NJ] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (NA > 0 && i % 16 == 0)
      for (int a = 0; a < NA; ++a) __builtin_prefetch(ahead[a] + i);
    v8 kv[NJ];
    for (int a = 0; a < NJ; ++a) kv[a] = load8(rows[a] + i);
    for (int r = 0; r < NR; ++r) {
      const v8 mv = load8(m + r * m_stride + i);
      for (int a = 0; a < NJ; ++a) acc[r][a] += mv * kv[a];
    }
  }
  float sums[NR][NJ];
  float four[4];
  if constexpr (NR == 4) {
    for (int a = 0; a < NJ; ++a) {
      hsum4(acc[0][a], acc[1][a], acc[2][a], acc[3][a], four);
      for (int r = 0; r < 4; ++r) sums[r][a] = four[r];
    }
  } else if constexpr (NJ == 4) {
    for (int r = 0; r < NR; ++r) {
      hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], four);
      for (int a = 0; a < 4; ++a) sums[r][a] = four[a];
    }
  } else {
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < NJ; ++a) sums[r][a] = hsum(acc[r][a]);
  }
  for (int r = 0; r < NR; ++r)
    for (int a = 0; a < NJ; ++a) {
      float s = sums[r][a];
      for (int64_t t = i; t < n; ++t) s += m[r * m_stride + t] * rows[a][t];
      c[r * TILE + a] = s;
    }
}

// Column vectors of 8 floats per register block in `mix_rows` and `mix_heads`: 4 where AVX-512's 32
// vector registers hold a block of 4 x 4 accumulators beside its loads (forward 6-9%, backward 3-7%
// faster than 2, the same sums), else 2. The blocks' loops unroll before GCC places their arrays.
#if defined(__AVX512VL__)
constexpr int NC = 4;
#else
constexpr int NC = 2;
#endif
#define UNROLL_FP32 _Pragma("GCC unroll 16")

// out_r[:n] += sum_j c[r * TILE + j] rows[j][:n] for r < nr (out_r = out + r * out_stride).
// Blocks of 4 heads x 8 NC columns held in registers across the tile's rows.
template <int NR>
inline void mix_rows_block(const float* const* rows, int64_t nj, const float* c, float* out, int64_t out_stride,
                           int64_t i) {
  v8 acc[NR][NC];
  UNROLL_FP32 for (int r = 0; r < NR; ++r)
    UNROLL_FP32 for (int u = 0; u < NC; ++u) acc[r][u] = load8(out + r * out_stride + i + 8 * u);
  for (int64_t j = 0; j < nj; ++j) {
    v8 a[NC];
    UNROLL_FP32 for (int u = 0; u < NC; ++u) a[u] = load8(rows[j] + i + 8 * u);
    UNROLL_FP32 for (int r = 0; r < NR; ++r) {
      const v8 w = splat(c[r * TILE + j]);
      UNROLL_FP32 for (int u = 0; u < NC; ++u) acc[r][u] += w * a[u];
    }
  }
  UNROLL_FP32 for (int r = 0; r < NR; ++r)
    UNROLL_FP32 for (int u = 0; u < NC; ++u) store8(out + r * out_stride + i + 8 * u, acc[r][u]);
}

void mix_rows(const float* const* rows, int64_t nj, const float* c, int64_t nr, float* out, int64_t out_stride,
              int64_t n) {
  for (int64_t r = 0; r < nr; r += 4) {
    const int64_t left = std::min<int64_t>(4, nr - r);
    int64_t i = 0;
    for (; i + 8 * NC <= n; i += 8 * NC) {
      if (left == 4) mix_rows_block<4>(rows, nj, c + r * TILE, out + r * out_stride, out_stride, i);
      else
        for (int64_t h = 0; h < left; ++h)
          mix_rows_block<1>(rows, nj, c + (r + h) * TILE, out + (r + h) * out_stride, out_stride, i);
    }
    for (int64_t h = r; h < r + left; ++h)
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t t = i; t < n; ++t) out[h * out_stride + t] += c[h * TILE + j] * rows[j][t];
  }
}

// targets[j][:n] += sum_r c[r * TILE + j] m_r[:n] for j < nj (m_r = m + r * m_stride).
// Blocks of 4 targets x 8 NC columns held in registers across the heads.
void mix_heads(float* const* targets, int64_t nj, const float* c, const float* m, int64_t m_stride, int64_t nr,
               int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= nj; j += 4) {
    int64_t i = 0;
    for (; i + 8 * NC <= n; i += 8 * NC) {
      v8 acc[4][NC] = {};
      for (int64_t r = 0; r < nr; ++r) {
        v8 a[NC];
        UNROLL_FP32 for (int u = 0; u < NC; ++u) a[u] = load8(m + r * m_stride + i + 8 * u);
        UNROLL_FP32 for (int t = 0; t < 4; ++t) {
          const v8 w = splat(c[r * TILE + j + t]);
          UNROLL_FP32 for (int u = 0; u < NC; ++u) acc[t][u] += w * a[u];
        }
      }
      UNROLL_FP32 for (int t = 0; t < 4; ++t)
        UNROLL_FP32 for (int u = 0; u < NC; ++u)
          store8(targets[j + t] + i + 8 * u, load8(targets[j + t] + i + 8 * u) + acc[t][u]);
    }
    for (int t = 0; t < 4; ++t)
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t x = i; x < n; ++x) targets[j + t][x] += c[r * TILE + j + t] * m[r * m_stride + x];
  }
  for (; j < nj; ++j)
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t x = 0; x < n; ++x) targets[j][x] += c[r * TILE + j] * m[r * m_stride + x];
}

#ifdef NANOSEEK_BF16
// ---- bf16 inputs (AVX-512 BF16: built where the CPU has it, native.py's "avx512bf16" target) ----
// The same loops over bf16 rows, each by vdpbf16ps, which multiplies pairs of bf16 and adds both
// products into one fp32 lane (32 products per instruction against a fused multiply-add's 16 fp32):
// the dot products (`scores`: q . k, dO . v), the sums over the picks (`mix_rows`: P V for the
// output, dS K for dq; two picked rows interleaved) and over the heads (`mix_heads`: dk, dv; two
// heads interleaved). Every sum is fp32; what is rounded to bf16 is what bf16 matrix products
// round: q, k, v and dO as given, and the weights P and dS (as SDPA's bf16 kernels round them).
typedef uint16_t bf16;

inline float bf16_to_float(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 float_to_bf16(float f) {  // round to nearest even; a NaN stays a (quiet) NaN
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<bf16>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh>(x); }
// The register blocks' loops are unrolled before GCC decides where their arrays live: arrays of
// 512-bit accumulators left to the usual unrolling were stored to the stack on every step.
#define UNROLL _Pragma("GCC unroll 16")
typedef float v16 __attribute__((vector_size(64)));
inline v16 dot_pairs(v16 acc, __m512i a, __m512i b) { return v16(_mm512_dpbf16_ps(__m512(acc), as_bh(a), as_bh(b))); }

// `scores` for bf16 rows and m: blocks of 3 rows x 4 heads, 32 columns a step; `ahead` as above (a
// 64-byte line holds 32 bf16: one line a row a step).
template <int NJ, int NR, int NA = 0>
inline void scores_block(const bf16* const* rows, const bf16* m, int64_t m_stride, int64_t n, float* c,
                         const bf16* const* ahead = nullptr) {
  v16 acc[NR][NJ] = {};
  for (int64_t i = 0; i < n; i += 32) {
    const __mmask32 mask = n - i >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (n - i)) - 1u);
    if (NA > 0)
      UNROLL for (int a = 0; a < NA; ++a) __builtin_prefetch(ahead[a] + i);
    __m512i kv[NJ];
    UNROLL for (int a = 0; a < NJ; ++a) kv[a] = _mm512_maskz_loadu_epi16(mask, rows[a] + i);
    UNROLL for (int r = 0; r < NR; ++r) {
      const __m512i mv = _mm512_maskz_loadu_epi16(mask, m + r * m_stride + i);
      UNROLL for (int a = 0; a < NJ; ++a) acc[r][a] = dot_pairs(acc[r][a], mv, kv[a]);
    }
  }
  v8 halves[NR][NJ];  // each accumulator's two halves added, then as `scores_block` above
  UNROLL for (int r = 0; r < NR; ++r)
    UNROLL for (int a = 0; a < NJ; ++a)
      halves[r][a] = v8(_mm256_add_ps(_mm512_castps512_ps256(__m512(acc[r][a])),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(__m512(acc[r][a])), 1))));
  float four[4];
  if constexpr (NR == 4) {
    UNROLL for (int a = 0; a < NJ; ++a) {
      hsum4(halves[0][a], halves[1][a], halves[2][a], halves[3][a], four);
      UNROLL for (int r = 0; r < 4; ++r) c[r * TILE + a] = four[r];
    }
  } else if constexpr (NJ == 4) {
    UNROLL for (int r = 0; r < NR; ++r) {
      hsum4(halves[r][0], halves[r][1], halves[r][2], halves[r][3], four);
      UNROLL for (int a = 0; a < 4; ++a) c[r * TILE + a] = four[a];
    }
  } else {
    UNROLL for (int r = 0; r < NR; ++r)
      UNROLL for (int a = 0; a < NJ; ++a) c[r * TILE + a] = hsum(halves[r][a]);
  }
}

// `mix_rows` for bf16 rows, two picks per vdpbf16ps: rows j and j + 1 interleaved a 32-column step
// at a time (unpacklo / unpackhi of 16-bit elements: per 128-bit lane, columns 8L..8L+3 in `lo`,
// 8L+4..8L+7 in `hi`), their weights rounded to a bf16 pair (c_{r,j}, c_{r,j+1}) (as a bf16 matrix
// product rounds P for P V and dS for dS K). Blocks of 4 heads x 32 NC columns; the accumulators,
// in that lane order, are put back in column order (permutex2var) and added to out once per call.
// (Widening each row to fp32 for 16-float fused multiply-adds left these sums at the fp32 rate:
// 14% of a bf16 forward's samples against 11% for its scores.)
inline __m512i lane_order(bool second) {
  return second ? _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)
                : _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
}

template <int NR, int NC>
inline void mix_rows_block(const bf16* const* rows, int64_t np, const uint32_t* c_pairs, float* out,
                           int64_t out_stride, int64_t i) {
  v16 lo[NR][NC] = {}, hi[NR][NC] = {};
  for (int64_t p = 0; p < np; ++p) {
    __m512i a[NC], b[NC];
    UNROLL for (int u = 0; u < NC; ++u) {
      const __m512i x = _mm512_loadu_si512(rows[2 * p] + i + 32 * u), y = _mm512_loadu_si512(rows[2 * p + 1] + i + 32 * u);
      a[u] = _mm512_unpacklo_epi16(x, y), b[u] = _mm512_unpackhi_epi16(x, y);
    }
    UNROLL for (int r = 0; r < NR; ++r) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(c_pairs[r * TILE + p]));
      UNROLL for (int u = 0; u < NC; ++u) lo[r][u] = dot_pairs(lo[r][u], a[u], w), hi[r][u] = dot_pairs(hi[r][u], b[u], w);
    }
  }
  UNROLL for (int r = 0; r < NR; ++r)
    UNROLL for (int u = 0; u < NC; ++u)
      UNROLL for (int half = 0; half < 2; ++half) {
        float* y = out + r * out_stride + i + 32 * u + 16 * half;
        const __m512 sum = _mm512_permutex2var_ps(__m512(lo[r][u]), lane_order(half), __m512(hi[r][u]));
        _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), sum));
      }
}

void mix_rows(const bf16* const* rows, int64_t nj, const float* c, int64_t nr, float* out, int64_t out_stride,
              int64_t n) {
  if (nj == 0) return;
  const int64_t np = (nj + 1) / 2;
  const bf16* paired[TILE + 1];  // rows j, j + 1 per pair; an odd last row pairs with a row of zeros
  uint32_t cp[4 * TILE];  // a block of heads' weights: (c_{r,2p}, c_{r,2p+1}) at h TILE + p
  for (int64_t j = 0; j < nj; ++j) paired[j] = rows[j];
  if (nj % 2) {  // zeros, not the row itself at weight 0: 0 * inf would be NaN where the sum is inf
    thread_local std::vector<bf16> zeros;
    if (static_cast<int64_t>(zeros.size()) < n) zeros.assign(n, bf16(0));
    paired[nj] = zeros.data();
  }
  for (int64_t r = 0; r < nr; r += 4) {
    const int64_t left = std::min<int64_t>(4, nr - r);
    for (int64_t h = 0; h < left; ++h)
      for (int64_t p = 0; p < np; ++p) {
        const float* c_h = c + (r + h) * TILE;
        const bf16 w1 = 2 * p + 1 < nj ? float_to_bf16(c_h[2 * p + 1]) : bf16(0);
        cp[h * TILE + p] = static_cast<uint32_t>(float_to_bf16(c_h[2 * p])) | (static_cast<uint32_t>(w1) << 16);
      }
    float* o = out + r * out_stride;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      if (left == 4) mix_rows_block<4, 2>(paired, np, cp, o, out_stride, i);
      else
        for (int64_t h = 0; h < left; ++h) mix_rows_block<1, 2>(paired, np, cp + h * TILE, o + h * out_stride, out_stride, i);
    }
    for (; i + 32 <= n; i += 32) {
      if (left == 4) mix_rows_block<4, 1>(paired, np, cp, o, out_stride, i);
      else
        for (int64_t h = 0; h < left; ++h) mix_rows_block<1, 1>(paired, np, cp + h * TILE, o + h * out_stride, out_stride, i);
    }
    for (int64_t h = 0; h < left; ++h)  // columns past the last 32, from the same rounded weights
      for (int64_t p = 0; p < np; ++p) {
        const float w0 = bf16_to_float(static_cast<bf16>(cp[h * TILE + p]));
        const float w1 = bf16_to_float(static_cast<bf16>(cp[h * TILE + p] >> 16));
        for (int64_t t = i; t < n; ++t)
          o[h * out_stride + t] += w0 * bf16_to_float(paired[2 * p][t]) + w1 * bf16_to_float(paired[2 * p + 1][t]);
      }
  }
}

// A row's R heads of m (R, n) bf16 as head pairs for vdpbf16ps: pair p's column x holds
// (m_{2p}[x], m_{2p+1}[x]) at 2 (p n + x), a zero in place of a missing last head.
void head_pairs(const bf16* m, int64_t m_stride, int64_t nr, int64_t n, bf16* pairs) {
  for (int64_t p = 0; p < (nr + 1) / 2; ++p) {
    const bf16* a = m + 2 * p * m_stride;
    const bf16* b = 2 * p + 1 < nr ? a + m_stride : nullptr;
    bf16* out = pairs + 2 * p * n;
    for (int64_t x = 0; x < n; ++x) out[2 * x] = a[x], out[2 * x + 1] = b ? b[x] : bf16(0);
  }
}

// A tile's weights c (R x TILE, fp32) as bf16 head pairs: (c[2p][j], c[2p+1][j]) packed in one 32-bit word.
void weight_pairs(const float* c, int64_t nr, int64_t nj, uint32_t* pairs) {
  for (int64_t p = 0; p < (nr + 1) / 2; ++p)
    for (int64_t j = 0; j < nj; ++j) {
      const bf16 lo = float_to_bf16(c[2 * p * TILE + j]);
      const bf16 hi = 2 * p + 1 < nr ? float_to_bf16(c[(2 * p + 1) * TILE + j]) : bf16(0);
      pairs[p * TILE + j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

// `mix_heads` from head pairs: targets[j][:n] += sum_r c_{r,j} m_r[:n], two heads per vdpbf16ps.
// Blocks of NT targets x 32 columns held in registers across the pairs.
template <int NT>
inline void mix_heads_block(float* const* targets, const uint32_t* c_pairs, const bf16* m_pairs, int64_t np,
                            int64_t n, int64_t i) {
  __m512 acc[NT][2];
  UNROLL for (int t = 0; t < NT; ++t) acc[t][0] = _mm512_setzero_ps(), acc[t][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    const bf16* m = m_pairs + 2 * (p * n + i);
    const __m512i a = _mm512_loadu_si512(m), b = _mm512_loadu_si512(m + 32);
    UNROLL for (int t = 0; t < NT; ++t) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(c_pairs[p * TILE + t]));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], as_bh(a), as_bh(w));
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], as_bh(b), as_bh(w));
    }
  }
  UNROLL for (int t = 0; t < NT; ++t) {
    float* y = targets[t] + i;
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), acc[t][0]));
    _mm512_storeu_ps(y + 16, _mm512_add_ps(_mm512_loadu_ps(y + 16), acc[t][1]));
  }
}

void mix_heads(float* const* targets, int64_t nj, const uint32_t* c_pairs, const bf16* m_pairs, int64_t nr, int64_t n) {
  const int64_t np = (nr + 1) / 2, wide = n / 32 * 32;
  for (int64_t j = 0; j < nj;) {
    const int64_t step = nj - j >= 4 ? 4 : 1;
    for (int64_t i = 0; i < wide; i += 32) {
      if (step == 4) mix_heads_block<4>(targets + j, c_pairs + j, m_pairs, np, n, i);
      else mix_heads_block<1>(targets + j, c_pairs + j, m_pairs, np, n, i);
    }
    for (int64_t t = j; t < j + step; ++t)  // columns past the last 32
      for (int64_t p = 0; p < np; ++p) {
        const float lo = bf16_to_float(static_cast<bf16>(c_pairs[p * TILE + t]));
        const float hi = bf16_to_float(static_cast<bf16>(c_pairs[p * TILE + t] >> 16));
        const bf16* m = m_pairs + 2 * p * n;
        for (int64_t x = wide; x < n; ++x) targets[t][x] += lo * bf16_to_float(m[2 * x]) + hi * bf16_to_float(m[2 * x + 1]);
      }
    j += step;
  }
}
#endif  // NANOSEEK_BF16

// c[r * TILE + j] = m_r . rows[j] for j < nj, r < nr: `scores_block`s of 3 rows x 4 heads (for T =
// float above, bf16 in the section above), the first pass over the rows fetching the next block's.
template <typename T>
void scores(const T* const* rows, int64_t nj, const T* m, int64_t m_stride, int64_t nr, int64_t n, float* c) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    int64_t j = 0;
    if (r == 0)  // the first pass over the rows: fetch the next block's while this one computes
      for (; j + 6 <= nj; j += 3) scores_block<3, 4, 3>(rows + j, m, m_stride, n, c + j, rows + j + 3);
    for (; j + 3 <= nj; j += 3) scores_block<3, 4>(rows + j, m + r * m_stride, m_stride, n, c + r * TILE + j);
    for (; j < nj; ++j) scores_block<1, 4>(rows + j, m + r * m_stride, m_stride, n, c + r * TILE + j);
  }
  for (; r < nr; ++r) {
    int64_t j = 0;
    for (; j + 4 <= nj; j += 4) scores_block<4, 1>(rows + j, m + r * m_stride, m_stride, n, c + r * TILE + j);
    for (; j < nj; ++j) scores_block<1, 1>(rows + j, m + r * m_stride, m_stride, n, c + r * TILE + j);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// exp of 8 floats: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), exp(r) by a degree-7 polynomial
// (Cephes' expf coefficients, ~1 ulp), 2^n through the exponent bits; x clamped to [-87, 88], so
// exp(-inf) comes out as ~1.6e-38 instead of 0, which no sum of weights here can tell from 0. A NaN
// stays NaN (max/min return their second operand when either is NaN), as std::exp's would.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// x[j] *= a for j < n; returns max(m, max_j x[j]).
inline float scale_max(float* x, int64_t n, float a, float m) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 top = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(a));
    _mm256_storeu_ps(x + j, v);
    top = _mm256_max_ps(top, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  for (float v : lanes) m = std::max(m, v);
#endif
  for (; j < n; ++j) m = std::max(m, x[j] *= a);
  return m;
}

// x[j] = exp(a x[j] + b) for j < n; returns their sum.
inline float exp_affine(float* x, int64_t n, float a, float b) {
  float sum = 0.f;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp8(_mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(a), _mm256_set1_ps(b)));
    _mm256_storeu_ps(x + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  sum = hsum(v8(acc));
#endif
  for (; j < n; ++j) sum += (x[j] = std::exp(a * x[j] + b));
  return sum;
}

// Where a (B, H, T, .) tensor's rows lie: its strides in elements over b, h and t (the last dim dense).
struct Strided {
  int64_t b, h, t;
  static Strided of(const at::Tensor& z) { return {z.stride(0), z.stride(1), z.stride(2)}; }
};

struct Layout {
  int64_t rows, t, g, r, x, v, s, k, v_stride, elem;  // elem: bytes per element of q, k, v
  float scale;
  Strided q;  // q (B, H, T, X) as given: a row's R heads (R, X) lie q.h apart
  // row n = (b, t, g): its picks are row n / G of picked, its key head b * G + g
  int64_t pick_row(int64_t n) const { return n / g; }
  int64_t head(int64_t n) const { return (n / (t * g)) * g + n % g; }
  // where row n's first head lies in a (B, H, T, .) tensor: query t of batch b, head g R
  int64_t at(const Strided& z, int64_t n) const { return (n / (t * g)) * z.b + (n % g) * r * z.h + (n / g) % t * z.t; }
};

Layout layout(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& v, int64_t d_v,
              const at::Tensor& picked, const at::Tensor& valid, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && picked.dim() == 2,
              "gathered attention: q (B, H, T, X), k (BG, S, X), picked (BT, K)");
  const auto dtype = q.scalar_type();
#ifdef NANOSEEK_BF16
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gathered attention: float32 or bfloat16 only");
#else
  TORCH_CHECK(dtype == at::kFloat, "gathered attention: float32 only (bfloat16 needs a CPU with AVX-512 BF16)");
#endif
  TORCH_CHECK(k.scalar_type() == dtype && (!v.has_value() || v->scalar_type() == dtype),
              "gathered attention: q, k and v of one dtype");
  TORCH_CHECK(picked.scalar_type() == at::kInt && valid.scalar_type() == at::kBool, "gathered attention: int32 picks, bool valid");
  TORCH_CHECK(q.stride(3) == 1 && k.is_contiguous() && picked.is_contiguous() && valid.is_contiguous(),
              "gathered attention: contiguous k, picks and valid; q's last dim dense");
  const int64_t b = q.size(0), h = q.size(1);
  TORCH_CHECK(b > 0 && k.size(0) > 0 && k.size(0) % b == 0 && h % (k.size(0) / b) == 0 &&
                  picked.size(0) == b * q.size(2) && k.size(2) == q.size(3),
              "gathered attention: shapes disagree");
  Layout L;
  L.t = q.size(2);
  L.g = k.size(0) / b;
  L.rows = b * L.t * L.g;
  L.r = h / L.g;
  L.x = q.size(3);
  L.q = Strided::of(q);
  L.s = k.size(1);
  L.k = picked.size(1);
  L.v = d_v;
  L.v_stride = v.has_value() ? v->size(2) : L.x;
  L.scale = static_cast<float>(scale);
  L.elem = q.element_size();
  TORCH_CHECK(valid.sizes() == picked.sizes(), "gathered attention: shapes disagree");
  TORCH_CHECK(!v.has_value() || (v->is_contiguous() && v->size(0) == k.size(0) && v->size(1) == L.s && v->size(2) == d_v),
              "gathered attention: v (BG, S, V), contiguous");
  TORCH_CHECK(v.has_value() || d_v <= L.x, "gathered attention: shared values wider than the keys");
  return L;
}

// Rows run in blocks: up to BLOCK_ROWS consecutive queries of one (batch, key head), rows that read
// the same key matrix. A block walks the keys a segment at a time: every row of the block takes its
// picks in the segment before the next segment starts, so a segment's rows (and in backward their
// gradient rows) are fetched from memory once per block and then read from the cache (L2 while a
// segment fits, L3 past it) by each row that picked them. (Per row, a query's picks lie anywhere in
// the keys; walking them row by row read each picked row from memory: 51 against 80 GFLOP/s with the
// same picks in cache, one Zen-4 core, 8 heads of 576 over 16K keys.)
constexpr int64_t BLOCK_ROWS = 64;
constexpr int64_t SEGMENT_BYTES = 576 << 10;  // key rows per segment at least: about half of a 1 MiB L2

// The blocks of a call: `count` of them, `size` queries each (fewer where rows are few, so that every
// thread gets blocks), a sequence's last block shorter.
struct Blocks {
  int64_t size, per_seq, count, t, g;
  explicit Blocks(const Layout& L) : t(L.t), g(L.g) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    size = std::clamp<int64_t>((L.rows + threads - 1) / threads, 1, BLOCK_ROWS);
    per_seq = (L.t + size - 1) / size;
    count = L.rows / L.t * per_seq;  // rows / t = B G sequences
  }
  int64_t rows_in(int64_t blk) const { return std::min(size, t - (blk % per_seq) * size); }
  int64_t row(int64_t blk, int64_t i) const {  // row (b, query, g) of the block's query i
    const int64_t seq = blk / per_seq, first = (blk % per_seq) * size;
    return ((seq / g) * t + first + i) * g + seq % g;
  }
};

// Backward's blocks in runs of consecutive blocks, one run per thread (each adds into its own dk):
// `count` runs of `per_part` blocks, each with at least one block.
struct Parts {
  int64_t per_part, count;
  explicit Parts(const Blocks& B) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B.count));
    per_part = (B.count + threads - 1) / threads;
    count = (B.count + per_part - 1) / per_part;
  }
};

// A block's valid picks grouped by key segment, each group in pick order: the block's row i has its
// picks in segment s at at(i, s)[0 .. count(i, s)).
//
// Segments are runs of whole tiles of key rows (bins of TILE rows: a run of picked neighbours, NSA's
// blocks, stays in one segment), planned per block from where its picks lie: a segment closes once it
// holds the block's picks for a tile per query on average (short tiles ran at 41 GFLOP/s, full ones at
// 48-52; one Zen-4 core, random picks over 64K keys) and at least SEGMENT_BYTES of rows. Where the
// picks crowd into part of the keys (CSA: its window beside the query, 512 of its 641 picks among the
// entries, a fifth of the rows) the segments there stay short enough for the cache; a plan from the
// average density over all the keys made them 5x longer, and a segment with its dk rows no longer
// fit in L3.
inline void check_pick(const Layout& L, int32_t pick) {
  TORCH_CHECK(pick >= 0 && pick < L.s, "gathered attention: pick ", pick, " outside ", L.s, " keys");
}

struct Segments {
  int64_t segs = 0, k = 0;
  std::vector<int32_t> keys;
  std::vector<int64_t> bounds, hist;
  std::vector<int32_t> seg_of_bin;

  void build(const Layout& L, const Blocks& B, int64_t blk, const int32_t* idx_all, const bool* ok_all) {
    const int64_t nb = B.rows_in(blk);
    const int64_t min_bins = (std::max<int64_t>(16, SEGMENT_BYTES / (L.elem * std::max<int64_t>(1, L.x))) + TILE - 1) / TILE;
    const int64_t bins = (L.s + TILE - 1) / TILE;
    k = L.k;
    keys.resize(nb * L.k);
    // the block's row i: its picks and whether each counts
    const auto picks = [&](int64_t i) { return idx_all + L.pick_row(B.row(blk, i)) * L.k; };
    const auto oks = [&](int64_t i) { return ok_all + L.pick_row(B.row(blk, i)) * L.k; };
    segs = 1;
    const bool planned = bins > min_bins;
    if (planned) {  // the block's picks per bin (each checked in range), then segments of whole bins
      hist.assign(bins, 0);
      for (int64_t i = 0; i < nb; ++i) {
        const int32_t* idx = picks(i);
        const bool* ok = oks(i);
        for (int64_t j = 0; j < L.k; ++j) {
          if (!ok[j]) continue;
          check_pick(L, idx[j]);
          ++hist[idx[j] / TILE];
        }
      }
      seg_of_bin.resize(bins);
      int64_t held = 0, span = 0;
      segs = 0;
      for (int64_t b = 0; b < bins; ++b) {
        seg_of_bin[b] = static_cast<int32_t>(segs);
        held += hist[b];
        if (++span >= min_bins && held >= TILE * nb && b + 1 < bins) ++segs, held = 0, span = 0;
      }
      ++segs;
    }
    bounds.assign(nb * (segs + 1), 0);
    std::vector<int64_t> next(segs);
    for (int64_t i = 0; i < nb; ++i) {  // a counting sort of the row's valid picks by segment
      const int32_t* idx = picks(i);
      const bool* ok = oks(i);
      int64_t* bound = bounds.data() + i * (segs + 1);
      int32_t* mine = keys.data() + i * L.k;
      if (segs == 1) {  // one segment: the valid picks in order
        for (int64_t j = 0; j < L.k; ++j) {
          if (!ok[j]) continue;
          if (!planned) check_pick(L, idx[j]);
          mine[bound[1]++] = idx[j];
        }
        continue;
      }
      for (int64_t j = 0; j < L.k; ++j)
        if (ok[j]) ++bound[seg_of_bin[idx[j] / TILE] + 1];
      for (int64_t g = 0; g < segs; ++g) bound[g + 1] += bound[g];
      std::copy(bound, bound + segs, next.begin());
      for (int64_t j = 0; j < L.k; ++j)
        if (ok[j]) mine[next[seg_of_bin[idx[j] / TILE]]++] = idx[j];
    }
  }
  const int32_t* at(int64_t i, int64_t g) const { return keys.data() + i * k + bounds[i * (segs + 1) + g]; }
  // the (row, segment) a block of nb rows takes after row i's segment g: the next row's, or the next
  // segment's first row's; false after the last
  bool next(int64_t i, int64_t g, int64_t nb, int64_t* ni, int64_t* ng) const {
    *ni = i + 1 < nb ? i + 1 : 0;
    *ng = i + 1 < nb ? g : g + 1;
    return *ng < segs;
  }
  int64_t count(int64_t i, int64_t g) const { return bounds[i * (segs + 1) + g + 1] - bounds[i * (segs + 1) + g]; }
};

// A block's rows of a (B, H, T, .) tensor z (n columns) copied into `rows`, the layout the loops
// read: row i's head r at (i R + r) w (forward, w = n), or at (2 i R + r) w (backward: q's and dO's
// heads of a row side by side, dO's from rows + R w). In z a row's heads lie z.h apart: T n elements
// in a contiguous z, a multiple of 4 KiB whenever T n times the element's bytes is, so read in place
// they would share the L1's sets and evict each other.
template <typename T>
void copy_rows(const Layout& L, const Blocks& B, int64_t blk, const T* z, const Strided& at, int64_t n, int64_t w,
               T* rows, int64_t per_row) {
  for (int64_t i = 0; i < B.rows_in(blk); ++i)
    for (int64_t r = 0; r < L.r; ++r) {
      const T* from = z + L.at(at, B.row(blk, i)) + r * at.h;
      std::copy(from, from + n, rows + i * per_row + r * w);
    }
}

// The rows the next (row, segment) of a block will read, up to a tile of them, fetched into L2
// (a line per 64 bytes, `bytes` of each row from `base` + pick * `stride` elements) while this one
// computes: picked rows lie anywhere in the keys, most in L3 or memory.
template <typename T>
void fetch_rows(const T* base, const int32_t* keys, int64_t count, int64_t stride, int64_t bytes, bool for_write) {
  for (int64_t j = 0; j < std::min(count, TILE); ++j) {
    const char* row = reinterpret_cast<const char*>(base + static_cast<int64_t>(keys[j]) * stride);
    for (int64_t b = 0; b < bytes; b += 64) {
      if (for_write) __builtin_prefetch(row + b, 1, 2);
      else __builtin_prefetch(row + b, 0, 2);
    }
  }
}

// One row's online-softmax state over its picks so far: running max m, sum l (R each), output o_n.
struct Running {
  float* m;
  float* l;
  float* o;
};

// The forward over one tile of a row's picks (jn <= TILE keys, their rows k_rows / v_rows).
template <typename T>
void forward_tile(const Layout& L, const T* q_n, const T* const* k_rows, const T* const* v_rows, int64_t jn,
                  Running st, int64_t o_stride, float* s) {
  scores(k_rows, jn, q_n, L.x, L.r, L.x, s);
  for (int64_t r = 0; r < L.r; ++r) {
    float* s_r = s + r * TILE;
    const float top = scale_max(s_r, jn, L.scale, st.m[r]);
    if (st.m[r] != NEG_INF && top > st.m[r]) {
      const float alpha = std::exp(st.m[r] - top);
      st.l[r] *= alpha;
      for (int64_t i = 0; i < L.v; ++i) st.o[r * o_stride + i] *= alpha;
    }
    st.m[r] = top;
    st.l[r] += exp_affine(s_r, jn, 1.f, -top);
  }
  mix_rows(v_rows, jn, s, L.r, st.o, o_stride, L.v);
}

// T: float, or bf16 (uint16_t) where built: q, k, v as T; out, lse and every sum fp32.
// sinks: nullptr, or one logit per query head (G R of them, head g R + r of key head g).
template <typename T>
void forward_rows(const Layout& L, const T* qp, const T* kp, const T* vp, const int32_t* idx_all, const bool* ok_all,
                  const float* sinks, float* op, const Strided& o_at, float* lp) {
  const Blocks B(L);
  at::parallel_for(0, B.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(L.r * TILE), m(B.size * L.r), l(B.size * L.r);
    std::vector<const T*> krows(TILE), vrows(TILE);
    std::vector<T> q_block(B.size * L.r * L.x);
    Segments seg;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t nb = B.rows_in(blk);
      seg.build(L, B, blk, idx_all, ok_all);
      copy_rows(L, B, blk, qp, L.q, L.x, L.x, q_block.data(), L.r * L.x);
      for (int64_t i = 0; i < nb; ++i) {  // the block's outputs zeroed here, where they are used next
        const float* sink = sinks ? sinks + (B.row(blk, i) % L.g) * L.r : nullptr;
        for (int64_t r = 0; r < L.r; ++r) {
          std::fill_n(op + L.at(o_at, B.row(blk, i)) + r * o_at.h, L.v, 0.f);
          m[i * L.r + r] = sink ? sink[r] : NEG_INF;
          l[i * L.r + r] = sink && sink[r] != NEG_INF ? 1.f : 0.f;  // a sink of -inf weighs nothing
        }
      }
      for (int64_t g = 0; g < seg.segs; ++g)
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t n = B.row(blk, i);
          const int32_t* keys = seg.at(i, g);
          const int64_t count = seg.count(i, g);
          const T* k_head = kp + L.head(n) * L.s * L.x;
          const T* v_head = vp + L.head(n) * L.s * L.v_stride;
          const Running st{m.data() + i * L.r, l.data() + i * L.r, op + L.at(o_at, n)};
          int64_t ni, ng;
          if (seg.next(i, g, nb, &ni, &ng)) {  // the rows the next (row, segment) picked
            const int64_t nn = B.row(blk, ni);
            fetch_rows(kp + L.head(nn) * L.s * L.x, seg.at(ni, ng), seg.count(ni, ng), L.x, L.x * L.elem, false);
            if (vp != kp)
              fetch_rows(vp + L.head(nn) * L.s * L.v_stride, seg.at(ni, ng), seg.count(ni, ng), L.v_stride,
                         L.v * L.elem, false);
          }
          for (int64_t j0 = 0; j0 < count; j0 += TILE) {
            const int64_t jn = std::min(TILE, count - j0);
            for (int64_t j = 0; j < jn; ++j) {
              krows[j] = k_head + static_cast<int64_t>(keys[j0 + j]) * L.x;
              vrows[j] = v_head + static_cast<int64_t>(keys[j0 + j]) * L.v_stride;
            }
            forward_tile(L, q_block.data() + i * L.r * L.x, krows.data(), vrows.data(), jn, st, o_at.h, s.data());
          }
        }
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t n = B.row(blk, i);
        for (int64_t r = 0; r < L.r; ++r) {
          const float l_r = l[i * L.r + r], m_r = m[i * L.r + r];
          const float inv = l_r > 0.f ? 1.f / l_r : 0.f;
          float* o_r = op + L.at(o_at, n) + r * o_at.h;
          for (int64_t c = 0; c < L.v; ++c) o_r[c] *= inv;
          lp[n * L.r + r] = l_r > 0.f ? m_r + std::log(l_r) : NEG_INF;
        }
      }
    }
  });
}

// The head sums of a tile in backward: dk_j += sum_r ds_{r,j} q_r and dv_j += sum_r p_{r,j} dO_r.
// A row's heads come as 2R rows W = max(X, V) apart, q's R then dO's R (`qd`), the tile's weights as
// 2R rows TILE apart, dS's R then P's R (`pd`). Where the values are the keys' first V columns, dv_j
// is dk_j's prefix and both sums go in one pass over dk_j's first V columns, 2R heads deep (dk's rows
// read and written once a tile, not twice), q's alone over the rest; else one pass each.
// fp32: straight from the row's heads. bf16: from the row's heads as pairs (`HeadSums::prepare`, once
// per row and segment) and the tile's weights rounded to bf16 pairs.
template <typename T>
struct HeadSums {
  void prepare(const Layout&, const T*, int64_t, bool) {}
  void add(const Layout& L, float* const* dk, float* const* dv, float* const* dk_tail, int64_t jn, const float* pd,
           const T* qd, int64_t w, bool shared) {
    if (shared) {
      mix_heads(dk, jn, pd, qd, w, 2 * L.r, L.v);
      if (L.x > L.v) mix_heads(dk_tail, jn, pd, qd + L.v, w, L.r, L.x - L.v);
    } else {
      mix_heads(dk, jn, pd, qd, w, L.r, L.x);
      mix_heads(dv, jn, pd + L.r * TILE, qd + L.r * w, w, L.r, L.v);
    }
  }
};

#ifdef NANOSEEK_BF16
template <>
struct HeadSums<bf16> {
  std::vector<bf16> pairs, tail_pairs;  // shared: [q ; dO]'s 2R heads, q's beyond V; else q's, dO's
  std::vector<uint32_t> c_pairs;
  void prepare(const Layout& L, const bf16* qd, int64_t w, bool shared) {
    const int64_t np = (L.r + 1) / 2;
    c_pairs.resize(2 * np * TILE);
    if (shared) {
      pairs.resize(2 * L.r * L.v), tail_pairs.resize(2 * np * (L.x - L.v));
      head_pairs(qd, w, 2 * L.r, L.v, pairs.data());
      if (L.x > L.v) head_pairs(qd + L.v, w, L.r, L.x - L.v, tail_pairs.data());
    } else {
      pairs.resize(2 * np * L.x), tail_pairs.resize(2 * np * L.v);
      head_pairs(qd, w, L.r, L.x, pairs.data());
      head_pairs(qd + L.r * w, w, L.r, L.v, tail_pairs.data());
    }
  }
  void add(const Layout& L, float* const* dk, float* const* dv, float* const* dk_tail, int64_t jn, const float* pd,
           const bf16*, int64_t, bool shared) {
    if (shared) {
      weight_pairs(pd, 2 * L.r, jn, c_pairs.data());
      mix_heads(dk, jn, c_pairs.data(), pairs.data(), 2 * L.r, L.v);
      if (L.x > L.v) {
        weight_pairs(pd, L.r, jn, c_pairs.data());
        mix_heads(dk_tail, jn, c_pairs.data(), tail_pairs.data(), L.r, L.x - L.v);
      }
    } else {
      weight_pairs(pd, L.r, jn, c_pairs.data());
      mix_heads(dk, jn, c_pairs.data(), pairs.data(), L.r, L.x);
      weight_pairs(pd + L.r * TILE, L.r, jn, c_pairs.data());
      mix_heads(dv, jn, c_pairs.data(), tail_pairs.data(), L.r, L.v);
    }
  }
};
#endif

template <typename T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
#ifdef NANOSEEK_BF16
  else return bf16_to_float(x);
#endif
}

template <typename T>
void backward_rows(const Layout& L, const T* qp, const T* kp, const T* vp, const int32_t* idx_all, const bool* ok_all,
                   const float* outp, const Strided& o_at, const float* lsep, const T* dop, const Strided& do_at,
                   float* dqp, const Strided& dq_at, float* dk_all, float* dv_all, float* d_all, int64_t heads) {
  const Blocks B(L);
  const Parts P(B);
  const int64_t part_k = heads * L.s * L.x, part_v = heads * L.s * L.v;
  at::parallel_for(0, P.count, 1, [&](int64_t pb, int64_t pe) {
    const bool shared = dv_all == nullptr;
    const int64_t w = std::max(L.x, L.v);  // a row's heads in qd_block: q's R, then dO's R, w apart
    std::vector<float> pd(2 * L.r * TILE), d(B.size * L.r);  // a tile's dS (R rows), then P (R rows)
    float* ds = pd.data();
    float* p = pd.data() + L.r * TILE;
    std::vector<const T*> krows(TILE), vrows(TILE);
    std::vector<float*> dkrows(TILE), dvrows(TILE), dktail(TILE);
    std::vector<T> qd_block(B.size * 2 * L.r * w);
    Segments seg;
    HeadSums<T> sums;
    for (int64_t part = pb; part < pe; ++part) {
      float* dk_mine = dk_all + part * part_k;
      float* dv_mine = dv_all ? dv_all + part * part_v : nullptr;
      for (int64_t blk = part * P.per_part; blk < std::min(B.count, (part + 1) * P.per_part); ++blk) {
        const int64_t nb = B.rows_in(blk);
        seg.build(L, B, blk, idx_all, ok_all);
        copy_rows(L, B, blk, qp, L.q, L.x, w, qd_block.data(), 2 * L.r * w);
        copy_rows(L, B, blk, dop, do_at, L.v, w, qd_block.data() + L.r * w, 2 * L.r * w);
        for (int64_t i = 0; i < nb; ++i) {  // D = dO . O per row and head; the row's dq zeroed
          const int64_t n = B.row(blk, i);
          for (int64_t r = 0; r < L.r; ++r) {
            std::fill_n(dqp + L.at(dq_at, n) + r * dq_at.h, L.x, 0.f);
            const T* do_r = qd_block.data() + (2 * i * L.r + L.r + r) * w;
            const float* o_r = outp + L.at(o_at, n) + r * o_at.h;
            float acc = 0.f;
            for (int64_t c = 0; c < L.v; ++c) acc += to_float(do_r[c]) * o_r[c];
            d[i * L.r + r] = d_all[n * L.r + r] = acc;
          }
        }
        for (int64_t g = 0; g < seg.segs; ++g)
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t n = B.row(blk, i);
            const int32_t* keys = seg.at(i, g);
            const int64_t count = seg.count(i, g);
            int64_t ni, ng;
            if (seg.next(i, g, nb, &ni, &ng)) {  // the rows the next (row, segment) picked, their gradients' rows
              const int64_t nh = L.head(B.row(blk, ni));
              const int32_t* next = seg.at(ni, ng);
              const int64_t nc = seg.count(ni, ng);
              fetch_rows(kp + nh * L.s * L.x, next, nc, L.x, L.x * L.elem, false);
              fetch_rows(dk_mine + nh * L.s * L.x, next, nc, L.x, L.x * 4, true);
              if (!shared) {
                fetch_rows(vp + nh * L.s * L.v_stride, next, nc, L.v_stride, L.v * L.elem, false);
                fetch_rows(dv_mine + nh * L.s * L.v, next, nc, L.v, L.v * 4, true);
              }
            }
            if (count == 0) continue;
            const T* q_n = qd_block.data() + 2 * i * L.r * w;
            const T* do_n = q_n + L.r * w;
            const float* lse_n = lsep + n * L.r;
            const float* d_n = d.data() + i * L.r;
            const int64_t h = L.head(n);
            const T* k_head = kp + h * L.s * L.x;
            const T* v_head = vp + h * L.s * L.v_stride;
            sums.prepare(L, q_n, w, shared);
            for (int64_t j0 = 0; j0 < count; j0 += TILE) {
              const int64_t jn = std::min(TILE, count - j0);
              for (int64_t j = 0; j < jn; ++j) {
                const int64_t key = keys[j0 + j];
                krows[j] = k_head + key * L.x;
                vrows[j] = v_head + key * L.v_stride;
                dkrows[j] = dk_mine + (h * L.s + key) * L.x;
                dvrows[j] = shared ? dkrows[j] : dv_mine + (h * L.s + key) * L.v;
                dktail[j] = dkrows[j] + L.v;
              }
              scores(krows.data(), jn, q_n, w, L.r, L.x, p);
              scores(vrows.data(), jn, do_n, w, L.r, L.v, ds);  // dP
              for (int64_t r = 0; r < L.r; ++r) {
                float* p_r = p + r * TILE;
                float* ds_r = ds + r * TILE;
                if (lse_n[r] == NEG_INF) std::fill(p_r, p_r + jn, 0.f);
                else exp_affine(p_r, jn, L.scale, -lse_n[r]);
                for (int64_t j = 0; j < jn; ++j) ds_r[j] = L.scale * p_r[j] * (ds_r[j] - d_n[r]);
              }
              mix_rows(krows.data(), jn, ds, L.r, dqp + L.at(dq_at, n), dq_at.h, L.x);
              sums.add(L, dkrows.data(), dvrows.data(), dktail.data(), jn, pd.data(), q_n, w, shared);
            }
          }
      }
    }
  });
}

template <typename T>
const T* data_of(const at::Tensor& x) {
  return reinterpret_cast<const T*>(x.data_ptr());
}

}  // namespace

// q (B, H, T, X), any strides with its last dim dense; returns out (B, H, T, V) (stored (B, T, H, V)
// where q's heads lie inside a query) and lse (B T G, R).
std::tuple<at::Tensor, at::Tensor> gathered_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const c10::optional<at::Tensor>& v, int64_t d_v,
                                                    const at::Tensor& picked, const at::Tensor& valid, double scale,
                                                    const c10::optional<at::Tensor>& sinks) {
  const auto f32 = q.options().dtype(at::kFloat);
  TORCH_CHECK(q.dim() == 4, "gathered attention: q (B, H, T, X)");
  if (q.size(0) * q.size(2) == 0)
    return {at::zeros({q.size(0), q.size(1), q.size(2), d_v}, f32), at::empty({0, q.size(1)}, f32)};
  const Layout L = layout(q, k, v, d_v, picked, valid, scale);
  TORCH_CHECK(!sinks.has_value() || (sinks->scalar_type() == at::kFloat && sinks->is_contiguous() &&
                                     sinks->numel() == L.g * L.r),
              "gathered attention: sinks, one float32 logit per query head (G R)");
  const float* sink_p = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
  // (B, H, T, V), stored as q is: heads inside a query where q's are (V4's (B, T, H, X) queries)
  auto out = q.size(1) > 1 && q.stride(1) < q.stride(2)
                 ? at::empty({q.size(0), L.t, q.size(1), L.v}, f32).transpose(1, 2)
                 : at::empty({q.size(0), q.size(1), L.t, L.v}, f32);  // every row zeroed by its block
  auto lse = at::empty({L.rows, L.r}, f32);
  const int32_t* idx = picked.data_ptr<int32_t>();
  const bool* ok = valid.data_ptr<bool>();
  const auto run = [&](auto element) {
    using T = decltype(element);
    const T* kp = data_of<T>(k);
    forward_rows<T>(L, data_of<T>(q), kp, v.has_value() ? data_of<T>(*v) : kp, idx, ok, sink_p,
                    out.data_ptr<float>(), Strided::of(out), lse.data_ptr<float>());
  };
#ifdef NANOSEEK_BF16
  if (q.scalar_type() == at::kBFloat16) run(bf16{});
  else
#endif
    run(float{});
  return {out, lse};
}

// d_out (B, H, T, V), any strides with its last dim dense. Returns dq (B, H, T, X) (q's strides where
// q is dense), dk, dv and D = dO . O per row and head (B T G, R) (for the sinks' gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gathered_backward(
    const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& v, int64_t d_v, const at::Tensor& picked,
    const at::Tensor& valid, double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& d_out) {
  const auto f32 = q.options().dtype(at::kFloat);
  TORCH_CHECK(q.dim() == 4, "gathered attention: q (B, H, T, X)");
  if (q.size(0) * q.size(2) == 0)
    return {at::zeros(q.sizes(), f32), at::zeros(k.sizes(), f32),
            v.has_value() ? at::zeros(v->sizes(), f32) : at::empty({0}, f32), at::empty({0, q.size(1)}, f32)};
  const Layout L = layout(q, k, v, d_v, picked, valid, scale);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), L.t, L.v};
  TORCH_CHECK(out.sizes() == out_shape && d_out.sizes() == out_shape && out.stride(3) == 1 &&
                  d_out.stride(3) == 1 && lse.is_contiguous(),
              "gathered attention: out and d_out (B, H, T, V), their last dim dense; lse contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat && d_out.scalar_type() == q.scalar_type(),
              "gathered attention: float32 out and lse, d_out in q's dtype");
  const Parts P{Blocks(L)};
  // one dk (and dv) per part, summed at the end: rows of different parts pick the same keys
  auto dk_parts = at::zeros({P.count, k.size(0), L.s, L.x}, f32);
  at::Tensor dv_parts;
  if (v.has_value()) dv_parts = at::zeros({P.count, k.size(0), L.s, L.v}, f32);
  auto dq = at::empty_like(q, f32);  // stored as q is where q is dense; every row zeroed by its block
  auto d_o = at::empty({L.rows, L.r}, f32);
  const int32_t* idx = picked.data_ptr<int32_t>();
  const bool* ok = valid.data_ptr<bool>();
  const auto run = [&](auto element) {
    using T = decltype(element);
    const T* kp = data_of<T>(k);
    backward_rows<T>(L, data_of<T>(q), kp, v.has_value() ? data_of<T>(*v) : kp, idx, ok, out.data_ptr<float>(),
                     Strided::of(out), lse.data_ptr<float>(), data_of<T>(d_out), Strided::of(d_out),
                     dq.data_ptr<float>(), Strided::of(dq), dk_parts.data_ptr<float>(),
                     v.has_value() ? dv_parts.data_ptr<float>() : nullptr, d_o.data_ptr<float>(), k.size(0));
  };
#ifdef NANOSEEK_BF16
  if (q.scalar_type() == at::kBFloat16) run(bf16{});
  else
#endif
    run(float{});
  auto dk = P.count == 1 ? dk_parts[0] : dk_parts.sum(0);
  auto dv = v.has_value() ? (P.count == 1 ? dv_parts[0] : dv_parts.sum(0)) : at::empty({0}, f32);
  return {dq, dk, dv, d_o};  // fp32; dv empty where the values are the keys' prefix
}

TORCH_LIBRARY(nanoseek, m) {
  m.def("gathered_attention(Tensor q, Tensor k, Tensor? v, int d_v, Tensor picked, Tensor valid, float scale,"
        " Tensor? sinks=None) -> (Tensor, Tensor)");
  m.def("gathered_attention_backward(Tensor q, Tensor k, Tensor? v, int d_v, Tensor picked, Tensor valid,"
        " float scale, Tensor out, Tensor lse, Tensor d_out) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("gathered_attention", &gathered_forward);
  m.impl("gathered_attention_backward", &gathered_backward);
}

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <algorithm>
#include <vector>

// DSA's key selection on the CPU: each query's top-k keys by the lightning indexer's score, among the
// keys it can see, by radix select instead of a sort.
//
// Row c of a chunk sees keys 0 .. (visible0 + c) / rate - 1 (the causal mask; the keys past it count as
// -inf): rate 1 for DSA's tokens, m for CSA's entries of m tokens (query c sees (rel_c + 1) / m of them).
// Its picks are exactly `earliest_topk`'s (model/attention/dsa.py): the k largest scores, ties at the
// k-th score going to the earliest keys; a pick is valid where its score is above -inf (a row that sees
// fewer than k keys picks the earliest keys past them, invalid). Per row:
//     key_s = the score's float bits made order-preserving (x + 0.0 first: -0.0 ties with 0.0)
//     T     = the k-th largest key, by three histogram passes over 12, 12 and 8 bits of the keys
//     picks = every s with key_s > T, then the earliest s with key_s = T until there are k
// emitted in ascending key order (the gathered attention then reads its rows front to back).
// Four passes over a row (its keys; their top bits' histogram; the keys in the k-th key's bucket,
// copied; the picks) and two over that copy, against a float top-k's partial sort. Rows run over
// torch's intra-op threads.

namespace {

inline uint32_t order_key(float x) {
  x += 0.0f;  // -0.0 -> 0.0
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
const uint32_t KEY_NEG_INF = order_key(NEG_INF);

// The bucket of hist[0..size) holding the `need`-th largest counted key, and how many keys lie above it.
struct Bucket {
  uint32_t value;
  int64_t above;
};

inline Bucket find_bucket(const int64_t* hist, int64_t size, int64_t need) {
  int64_t above = 0;
  for (int64_t b = size - 1; b > 0; --b) {
    if (above + hist[b] >= need) return {static_cast<uint32_t>(b), above};
    above += hist[b];
  }
  return {0, above};
}

// The k-th largest of keys[0..n) (1 <= k <= n) and how many keys equal to it the picks take: the top
// 12 bits' histogram, then the next 12 and the last 8 bits' among the keys in the chosen buckets.
struct Threshold {
  uint32_t key;
  int64_t take_equal;
};

Threshold kth_key(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& cand) {
  // four interleaved histograms: a run of equal keys (ReLU's zeros) would chain every increment
  int64_t quad[4][1 << 12] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int q = 0; q < 4; ++q) ++quad[q][keys[i + q] >> 20];
  for (; i < n; ++i) ++quad[0][keys[i] >> 20];
  int64_t hist[1 << 12];
  for (int b = 0; b < (1 << 12); ++b) hist[b] = quad[0][b] + quad[1][b] + quad[2][b] + quad[3][b];
  const Bucket b1 = find_bucket(hist, 1 << 12, k);
  cand.clear();
  for (int64_t s = 0; s < n; ++s)
    if ((keys[s] >> 20) == b1.value) cand.push_back(keys[s]);
  std::fill(hist, hist + (1 << 12), 0);
  for (uint32_t key : cand) ++hist[(key >> 8) & 0xFFF];
  const Bucket b2 = find_bucket(hist, 1 << 12, k - b1.above);
  std::fill(hist, hist + 256, 0);
  for (uint32_t key : cand)
    if (((key >> 8) & 0xFFF) == b2.value) ++hist[key & 0xFF];
  const Bucket b3 = find_bucket(hist, 256, k - b1.above - b2.above);
  return {(b1.value << 20) | (b2.value << 8) | b3.value, k - b1.above - b2.above - b3.above};
}

// scores (B, C, S) fp32; row c of each batch sees keys 0 .. (visible0 + c) / rate - 1 (at most S). Returns
// the picks (B, C, k) int64 in ascending key order and whether each is valid (B, C, k) bool.
std::tuple<at::Tensor, at::Tensor> indexer_topk(const at::Tensor& scores, int64_t visible0, int64_t k, int64_t rate) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(),
              "indexer_topk: scores must be a (B, C, S) float32 CPU tensor");
  const at::Tensor x = scores.contiguous();
  const int64_t batch = x.size(0), chunk = x.size(1), n = x.size(2);
  TORCH_CHECK(k >= 1 && k <= n, "indexer_topk: k=", k, " must be in [1, S=", n, "]");
  TORCH_CHECK(visible0 >= 0, "indexer_topk: visible0=", visible0, " must be >= 0");
  TORCH_CHECK(rate >= 1, "indexer_topk: rate=", rate, " must be >= 1");
  at::Tensor picked = at::empty({batch, chunk, k}, x.options().dtype(at::kLong));
  at::Tensor valid = at::empty({batch, chunk, k}, x.options().dtype(at::kBool));
  const float* xs = x.data_ptr<float>();
  int64_t* ps = picked.data_ptr<int64_t>();
  bool* vs = valid.data_ptr<bool>();
  at::parallel_for(0, batch * chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(n), cand;
    for (int64_t row = begin; row < end; ++row) {
      const float* score = xs + row * n;
      const int64_t seen = std::min(n, (visible0 + row % chunk) / rate);
      for (int64_t s = 0; s < seen; ++s) keys[s] = order_key(score[s]);
      std::fill(keys.begin() + seen, keys.end(), KEY_NEG_INF);
      const Threshold t = kth_key(keys.data(), n, k, cand);
      int64_t* pick = ps + row * k;
      bool* ok = vs + row * k;
      int64_t j = 0, equal = 0;
      for (int64_t s = 0; s < n && j < k; ++s) {
        const uint32_t key = keys[s];
        if (key > t.key || (key == t.key && equal++ < t.take_equal)) {
          pick[j] = s;
          ok[j++] = s < seen && score[s] > NEG_INF;  // NaN: invalid, as the reference's `> -inf`
        }
      }
    }
  });
  return {picked, valid};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("indexer_topk(Tensor scores, int visible0, int k, int rate=1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("indexer_topk", &indexer_topk); }

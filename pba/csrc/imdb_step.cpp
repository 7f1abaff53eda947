// One training step of pba.models.IMDBClassifier (one encoder block) on the CPU, forward and
// backward written out by hand, in the manner of llm.c: the PyTorch model is the specification,
// this file is a faster way to compute the same function and its gradient.
//
// Layout: tokens n = b * L + l, rows of width d; head h owns columns [h * dk, (h + 1) * dk).
// Every matrix product (W^Q, W^K, W^V, W^O, the FFN, W^A, and the four products of the attention
// core of every (review, head) pair) goes through one small register-tiled gemm below; the
// softmax, the layer norms, dropout, pooling and the loss are loops over data that fits in the
// L1 cache. Gradients are written into the tensors in `grads`.
//
// Dropout draws one 32-bit hash per element from (seed, step, site, index): counter-based, so a
// step's masks depend on nothing but those numbers.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

enum Variant : int64_t { kStandard = 0, kOptimised = 1, kEfficient = 2, kSuper = 3 };
constexpr int64_t kMaxLength = 512;  // longest input (stack buffers of the attention core)

// ---------------------------------------------------------------------------------- helpers
inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint32_t hash32(uint32_t x) {  // "lowbias32" (Wellons): a well-mixed 32-bit permutation
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Maximum and sum of n floats in 8 lanes, so that the compiler can vectorise them without
// -ffast-math (which would also let it drop the infinities that masking relies on).
inline float lane_max(const float* __restrict__ x, int64_t n) {
  float acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] = acc[t] > x[j + t] ? acc[t] : x[j + t];
  float m = -INFINITY;
  for (int t = 0; t < 8; ++t) m = std::max(m, acc[t]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float lane_sum(const float* __restrict__ x, int64_t n) {
  float acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] += x[j + t];
  float total = 0.0f;
  for (int t = 0; t < 8; ++t) total += acc[t];
  for (; j < n; ++j) total += x[j];
  return total;
}

inline float lane_dot(const float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  float acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) acc[t] += x[j + t] * y[j + t];
  float total = 0.0f;
  for (int t = 0; t < 8; ++t) total += acc[t];
  for (; j < n; ++j) total += x[j] * y[j];
  return total;
}

// Eight floats as one value (GCC/Clang vector extensions: AVX on x86, pairs of NEON registers on
// ARM). The attention core uses them where the length and the head width are multiples of 8.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, v8f v) { __builtin_memcpy(p, &v, sizeof v); }

inline v8f splat8(float x) { return v8f{} + x; }

inline v8f max8(v8f a, v8f b) { return a > b ? a : b; }

// The halves of exp's evaluation that differ between one float and eight.
inline float at_least(float x, float lo) { return std::max(x, lo); }
inline v8f at_least(v8f x, float lo) { return max8(x, splat8(lo)); }

inline float power_of_two(float n) {  // 2^n for an integral n in [-126, 127]
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

inline v8f power_of_two(v8f n) {
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return scale;
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), on a float or eight: 2^n * p(r)
// with r = x - n ln 2, Cephes' polynomial; relative error below 2e-7.
template <typename T>
inline T exp_nonpositive(T x) {
  x = at_least(x, -87.0f);
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const T r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * power_of_two(n);
}

// scale[i] = keep / (1 - p) for the i-th element of a dropout site: 0 with probability p.
void dropout_scales(float* out, int64_t count, double p, uint64_t seed, int64_t step, int site) {
  if (p <= 0.0) {
    std::fill(out, out + count, 1.0f);
    return;
  }
  const uint64_t key = splitmix64(splitmix64(seed) ^ (static_cast<uint64_t>(step) * 8 + site));
  const uint32_t key_lo = static_cast<uint32_t>(key), key_hi = static_cast<uint32_t>(key >> 32);
  const uint32_t threshold = static_cast<uint32_t>(std::llround(p * 4294967296.0));
  const float kept = static_cast<float>(1.0 / (1.0 - p));
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t u = hash32(hash32(static_cast<uint32_t>(i) ^ key_lo) + key_hi);
    out[i] = u >= threshold ? kept : 0.0f;
  }
}

// y = LayerNorm(r) with saved xhat and rstd per row.
void layer_norm_forward(const float* __restrict__ r, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ xhat,
                        float* __restrict__ rstd, int64_t rows, int64_t d, float eps) {
  std::vector<float> centred(d);
  for (int64_t n = 0; n < rows; ++n) {
    const float* x = r + n * d;
    const float mean = lane_sum(x, d) / static_cast<float>(d);
    for (int64_t c = 0; c < d; ++c) centred[c] = x[c] - mean;
    const float var = lane_dot(centred.data(), centred.data(), d) / static_cast<float>(d);
    const float s = 1.0f / std::sqrt(var + eps);
    rstd[n] = s;
    for (int64_t c = 0; c < d; ++c) {
      const float h = centred[c] * s;
      xhat[n * d + c] = h;
      y[n * d + c] = h * gamma[c] + beta[c];
    }
  }
}

// dr = LayerNorm backward of dy; accumulates dgamma, dbeta.
void layer_norm_backward(const float* __restrict__ dy, const float* __restrict__ xhat,
                         const float* __restrict__ rstd, const float* __restrict__ gamma, float* __restrict__ dr,
                         float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t rows, int64_t d) {
  std::vector<float> g(d);
  for (int64_t n = 0; n < rows; ++n) {
    const float* dyn = dy + n * d;
    const float* h = xhat + n * d;
    for (int64_t c = 0; c < d; ++c) {
      dgamma[c] += dyn[c] * h[c];
      dbeta[c] += dyn[c];
      g[c] = dyn[c] * gamma[c];
    }
    const float mean_g = lane_sum(g.data(), d) / static_cast<float>(d);
    const float mean_gh = lane_dot(g.data(), h, d) / static_cast<float>(d);
    for (int64_t c = 0; c < d; ++c) dr[n * d + c] = rstd[n] * (g[c] - mean_g - h[c] * mean_gh);
  }
}

float* fp(const Tensor& t) { return t.data_ptr<float>(); }

struct Shapes {
  int64_t B, L, d, h, dk, N;
};

// ---------------------------------------------------------------------- small matrix products
// C = init + A B at the step's sizes: 2048 tokens by 32 x 32 weights, the weight gradients'
// 32 x 32 summed over 2048 tokens, and the attention core's 32 x 32 by 32 x 8. At these sizes
// MKL's general routine spent a third of its time packing and pre-scaling operands (perf, one
// step). A is read in either orientation,
// A(m, k) = a[m * a_row + k * a_col]; B(k, n) = b[k * ldb + n]; init(m, n) = init[m * ld_init + n]
// with ld_init = 0 for a bias (one row), init = c to accumulate, nullptr for zero.
struct MatrixA {
  const float* p;
  int64_t row, col;
};

// One tile of MR rows and NV * 8 columns: MR * NV accumulators stay in registers for all of K.
template <int MR, int NV>
__attribute__((always_inline)) inline void gemm_tile(int64_t K, MatrixA a, const float* __restrict__ b, int64_t ldb,
                                                     float* c, int64_t ldc, const float* init, int64_t ld_init) {
  v8f acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = init ? load8(init + r * ld_init + 8 * v) : v8f{};
  const float* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = a.p + r * a.row;
  for (int64_t k = 0; k < K; ++k) {
    v8f bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load8(b + k * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const float ark = rows[r][k * a.col];
      for (int v = 0; v < NV; ++v) acc[r][v] += ark * bk[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

// Every row of a panel of NV * 8 columns, in tiles of 6 rows of two vectors or 8 rows of one
// (enough independent multiply-adds to hide their latency), then the last rows.
template <int NV>
void gemm_panel(int64_t M, int64_t K, MatrixA a, const float* b, int64_t ldb, float* c, int64_t ldc, const float* init,
                int64_t ld_init) {
  static_assert(NV == 1 || NV == 2, "one or two vectors of columns");
  constexpr int kRows = NV == 1 ? 8 : 6;
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    gemm_tile<kRows, NV>(K, {a.p + m * a.row, a.row, a.col}, b, ldb, c + m * ldc, ldc,
                         init ? init + m * ld_init : nullptr, ld_init);
  const MatrixA rest{a.p + m * a.row, a.row, a.col};
  float* c_rest = c + m * ldc;
  const float* init_rest = init ? init + m * ld_init : nullptr;
  switch (M - m) {  // at most kRows - 1
    case 7: if constexpr (kRows > 7) gemm_tile<7, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 6: if constexpr (kRows > 6) gemm_tile<6, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 5: if constexpr (kRows > 5) gemm_tile<5, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 4: if constexpr (kRows > 4) gemm_tile<4, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 3: gemm_tile<3, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 2: gemm_tile<2, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    case 1: gemm_tile<1, NV>(K, rest, b, ldb, c_rest, ldc, init_rest, ld_init); break;
    default: break;
  }
}

// C (M x N, rows ldc apart) = init + A B, for any sizes: panels of 16 and 8 columns, then the
// last N % 8 columns one at a time. C must not overlap A or B.
void gemm(int64_t M, int64_t N, int64_t K, MatrixA a, const float* b, int64_t ldb, float* c, int64_t ldc,
          const float* init, int64_t ld_init) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) gemm_panel<2>(M, K, a, b + n, ldb, c + n, ldc, init ? init + n : nullptr, ld_init);
  for (; n + 8 <= N; n += 8) gemm_panel<1>(M, K, a, b + n, ldb, c + n, ldc, init ? init + n : nullptr, ld_init);
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float sum = init ? init[m * ld_init + n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += a.p[m * a.row + k * a.col] * b[k * ldb + n];
      c[m * ldc + n] = sum;
    }
}

// ------------------------------------------------------------------------- the attention core
// load(p, T{}) and store: one float or eight, so that one loop body serves both (for_lanes).
inline float load(const float* p, float) { return *p; }
inline v8f load(const float* p, v8f) { return load8(p); }
inline void store(float* p, float x) { *p = x; }
inline void store(float* p, v8f x) { store8(p, x); }
inline float max_of(float a, float b) { return a > b ? a : b; }
inline v8f max_of(v8f a, v8f b) { return max8(a, b); }

// f(j, T{}) for j = 0, 8, 16, ... with T = v8f while eight lanes fit, then with T = float.
template <typename F>
inline void for_lanes(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) f(j, v8f{});
  for (; j < n; ++j) f(j, float{});
}

// dst (width x L) = scale * the head's columns of src (L rows, d apart), transposed.
inline void transpose_head(const float* __restrict__ src, int64_t d, int64_t L, int64_t width, float scale,
                           float* __restrict__ dst) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t c = 0; c < width; ++c) dst[c * L + j] = scale * src[j * d + c];
}

// The attention core of one (review, head): probabilities P (L x L, P[i][j] = weight of query i
// on key j) and the head's output columns of `out`; q, k, v and out are the head's first columns
// of rows d apart. The four products are small gemms; kT is L * dk floats of scratch.
void attention_forward(const float* q, const float* k, const float* v, const bool* allowed, bool over_queries,
                       float scale, float* __restrict__ P, float* out, const Shapes& s, float* kT) {
  const int64_t L = s.L, d = s.d, dk = s.dk;
  // keep[j] = 1 for a key that may be read, 0 for padding; bar[j] = 0 or -inf likewise
  float keep[kMaxLength], bar[kMaxLength];
  for (int64_t j = 0; j < L; ++j) {
    keep[j] = allowed[j] ? 1.0f : 0.0f;
    bar[j] = allowed[j] ? 0.0f : -INFINITY;
  }
  transpose_head(k, d, L, dk, scale, kT);
  // S = scale Q K^T, plus bar on every row when the softmax runs over keys
  gemm(L, L, dk, {q, d, 1}, kT, L, P, L, over_queries ? nullptr : bar, 0);
  if (!over_queries) {  // softmax over keys: each row
    for (int64_t i = 0; i < L; ++i) {
      float* row = P + i * L;
      const float m = lane_max(row, L);
      if (m == -INFINITY) {  // no key to read: all-zero weights
        std::fill(row, row + L, 0.0f);
        continue;
      }
      for_lanes(L, [&](int64_t j, auto lanes) {
        store(row + j, exp_nonpositive(load(row + j, lanes) - m) * load(keep + j, lanes));
      });
      const float inv = 1.0f / lane_sum(row, L);
      for_lanes(L, [&](int64_t j, auto lanes) { store(row + j, load(row + j, lanes) * inv); });
    }
  } else {  // softmax over queries: each column; a padded key's column is all zero
    for_lanes(L, [&](int64_t j, auto lanes) {
      using T = decltype(lanes);
      T m = T{} - INFINITY, sum{};
      for (int64_t i = 0; i < L; ++i) m = max_of(m, load(P + i * L + j, lanes));
      for (int64_t i = 0; i < L; ++i) {
        const T e = exp_nonpositive(load(P + i * L + j, lanes) - m) * load(keep + j, lanes);
        store(P + i * L + j, e);
        sum += e;
      }
      const T inv = load(keep + j, lanes) / max_of(sum, T{} + 1.0f);  // an allowed column sums to >= 1
      for (int64_t i = 0; i < L; ++i) store(P + i * L + j, load(P + i * L + j, lanes) * inv);
    });
  }
  gemm(L, dk, L, {P, L, 1}, v, d, out, d, nullptr, 0);  // O = P V
}

// Gradients of one (review, head): dq, dk, dv (written, not accumulated) from d_out; vT is
// L * dk floats of scratch, dS L * L.
void attention_backward(const float* q, const float* k, const float* v, const float* P, const float* d_out,
                        bool over_queries, float scale, float* dq, float* dkey, float* dv, const Shapes& s, float* vT,
                        float* __restrict__ dS) {
  const int64_t L = s.L, d = s.d, dk = s.dk;
  transpose_head(v, d, L, dk, 1.0f, vT);
  gemm(L, L, dk, {d_out, d, 1}, vT, L, dS, L, nullptr, 0);  // dP = dO V^T
  gemm(L, dk, L, {P, 1, L}, d_out, d, dv, d, nullptr, 0);   // dV = P^T dO
  if (!over_queries) {  // dS = P * (dP - rowsum(P * dP)), times the score scale
    for (int64_t i = 0; i < L; ++i) {
      const float* p = P + i * L;
      float* g = dS + i * L;
      const float dot = lane_dot(p, g, L);
      for_lanes(L, [&](int64_t j, auto lanes) {
        store(g + j, load(p + j, lanes) * (load(g + j, lanes) - dot) * scale);
      });
    }
  } else {  // the same down each column
    for_lanes(L, [&](int64_t j, auto lanes) {
      using T = decltype(lanes);
      T dot{};
      for (int64_t i = 0; i < L; ++i) dot += load(P + i * L + j, lanes) * load(dS + i * L + j, lanes);
      for (int64_t i = 0; i < L; ++i)
        store(dS + i * L + j, load(P + i * L + j, lanes) * (load(dS + i * L + j, lanes) - dot) * scale);
    });
  }
  gemm(L, dk, L, {dS, L, 1}, k, d, dq, d, nullptr, 0);    // dQ = dS K
  gemm(L, dk, L, {dS, 1, L}, q, d, dkey, d, nullptr, 0);  // dK = dS^T Q
}

// A buffer kept from call to call, one per name and shape: a fresh 256 KiB tensor every step
// would cost a page fault per 4 KiB. Not for tensors handed back to Python, and like the rest of
// this file for one thread at a time.
Tensor reused(const std::string& name, at::IntArrayRef shape, const at::TensorOptions& opts) {
  static std::unordered_map<std::string, Tensor> buffers;
  std::string key(name);
  for (const int64_t size : shape) key += ":" + std::to_string(size);
  auto found = buffers.find(key);
  if (found != buffers.end()) return found->second;
  Tensor buffer = at::empty(shape, opts);
  buffers.emplace(key, buffer);
  return buffer;
}

// The three products of a linear layer y = x W^T + bias (x: rows x in, W: out x in), all tensors
// contiguous.
Tensor linear(Tensor y, const Tensor& x, const Tensor& weight, const Tensor& bias) {  // y = x W^T + bias
  const int64_t rows = x.size(0), in = x.size(1), out = weight.size(0);
  std::vector<float> weight_t(in * out);  // W^T (in x out): B's rows must be contiguous
  const float* w = fp(weight);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) weight_t[i * out + o] = w[o * in + i];
  gemm(rows, out, in, {fp(x), in, 1}, weight_t.data(), out, fp(y), out, fp(bias), 0);
  return y;
}

void linear_input_grad(const Tensor& dy, const Tensor& weight, float* dx, const float* init) {  // dx = init + dy W
  const int64_t rows = dy.size(0), out = weight.size(0), in = weight.size(1);
  gemm(rows, in, out, {fp(dy), out, 1}, fp(weight), in, dx, in, init, in);
}

// dW = dy^T x, dbias = the column sums of dy
void linear_param_grads(const Tensor& dy, const Tensor& x, Tensor& dweight, Tensor& dbias) {
  const int64_t rows = dy.size(0), out = dy.size(1), in = x.size(1);
  const float* g = fp(dy);
  // in slices of 64 tokens (16 KiB of dy and x at d = 32): each slice is read from L2 once and
  // reused from L1 by every tile of dW, instead of every tile streaming all of dy and x
  constexpr int64_t kSlice = 64;
  float* dw = fp(dweight);
  for (int64_t k = 0; k < rows; k += kSlice)
    gemm(out, in, std::min(kSlice, rows - k), {g + k * out, 1, out}, fp(x) + k * in, in, dw, in, k == 0 ? nullptr : dw,
         in);
  float* db = fp(dbias);
  std::fill(db, db + out, 0.0f);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t o = 0; o < out; ++o) db[o] += g[n * out + o];
}

// The post-LN residual of a block: out = LayerNorm(x + a * m), m the dropout scales; xhat and
// rstd kept for the backward. Buffers named after `tag`.
struct Normed {
  Tensor out, xhat, rstd;
};

Normed residual_layer_norm(const std::string& tag, const Tensor& x, const Tensor& a, const Tensor& m,
                           const Tensor& gamma, const Tensor& beta, float eps) {
  const int64_t rows = x.size(0), d = x.size(1);
  const auto opts = x.options();
  Tensor sum = reused(tag + "_sum", {rows, d}, opts);
  float* r = sum.data_ptr<float>();
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *mp = m.data_ptr<float>();
  for (int64_t i = 0; i < rows * d; ++i) r[i] = xp[i] + ap[i] * mp[i];
  Normed n{reused(tag + "_out", {rows, d}, opts), reused(tag + "_xhat", {rows, d}, opts),
           reused(tag + "_rstd", {rows}, opts)};
  layer_norm_forward(r, gamma.data_ptr<float>(), beta.data_ptr<float>(), n.out.data_ptr<float>(),
                     n.xhat.data_ptr<float>(), n.rstd.data_ptr<float>(), rows, d, eps);
  return n;
}

// out = max(x, 0), and g = 0 where x <= 0 (ReLU's backward), eight lanes at a time
void relu(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, max8(load8(x + i), v8f{}));
  for (; i < n; ++i) out[i] = std::max(x[i], 0.0f);
}

void relu_backward(const float* __restrict__ x, float* __restrict__ g, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(g + i, load8(x + i) > 0.0f ? load8(g + i) : v8f{});
  for (; i < n; ++i) g[i] = x[i] > 0.0f ? g[i] : 0.0f;
}

// out = a * b elementwise, over n floats
void multiply(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

}  // namespace

// params (in this order, empty tensors where the variant has none):
//  0 token embedding (V, d)   1 position embedding (Lmax, d)
//  2 W^Q  3 b^Q  4 W^K  5 b^K  6 W^V  7 b^V  8 W^O  9 b^O  10 W^A (Lmax, Lmax)  11 W^A bias (Lmax)
//  12 FFN W1  13 b1  14 FFN W2  15 b2  16 LN1 gamma  17 LN1 beta  18 LN2 gamma  19 LN2 beta
//  20 head W1 (6, d)  21 head b1  22 head W2 (1, 6)  23 head b2
// Returns {loss (mean BCE), logits (B)}; with want_masks also the four dropout scale tensors.
// With backward = false: the logits alone (no labels, no gradients), for evaluation.
std::vector<Tensor> train_step(const Tensor& ids, const Tensor& previous_ids, const Tensor& labels,
                               const std::vector<Tensor>& params,
                               std::vector<Tensor> grads, int64_t variant, int64_t n_heads,
                               bool over_queries, bool padding_mask, bool masked_pooling, int64_t pad_id,
                               double ln_eps, double dropout_p, int64_t seed, int64_t step, bool want_masks,
                               bool backward) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids: contiguous int64 (B, L)");
  TORCH_CHECK(previous_ids.scalar_type() == at::kLong && previous_ids.is_contiguous(), "previous_ids: contiguous int64");
  TORCH_CHECK(!backward || (labels.dim() == 1 && labels.size(0) == ids.size(0) &&
                            labels.scalar_type() == at::kFloat && labels.is_contiguous()),
              "labels: contiguous float32 (B,)");
  TORCH_CHECK(params.size() == 24 && grads.size() == 24, "24 parameter and gradient slots");
  TORCH_CHECK(variant >= kStandard && variant <= kSuper, "variant: 0..3");
  Shapes s;
  s.B = ids.size(0);
  s.L = ids.size(1);
  s.d = params[0].size(1);
  s.h = n_heads;
  s.dk = s.d / n_heads;
  s.N = s.B * s.L;
  const int64_t B = s.B, L = s.L, d = s.d, N = s.N, V = params[0].size(0);
  TORCH_CHECK(L <= params[1].size(0) && L <= kMaxLength, "ids longer than the position table");
  TORCH_CHECK(n_heads > 0 && s.d % n_heads == 0, "n_heads must divide d_model");
  const bool learns_keys = variant == kStandard || variant == kOptimised;
  const bool learns_values = variant == kStandard;
  const bool is_super = variant == kSuper;
  const bool wa_bias = is_super && params[11].numel() > 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dk));
  const float eps = static_cast<float>(ln_eps);
  const auto opts = params[0].options();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* y = backward ? labels.data_ptr<float>() : nullptr;
  // Gradients are overwritten, except the token embedding's: it is zero outside the rows that
  // the previous step wrote (`previous_ids`), so only those are cleared.
  if (backward) {
    for (size_t i = 1; i < grads.size(); ++i)
      if (grads[i].numel() > 0) grads[i].zero_();
    float* dE = fp(grads[0]);
    const int64_t* prev = previous_ids.data_ptr<int64_t>();
    for (int64_t n = 0; n < previous_ids.numel(); ++n) std::fill(dE + prev[n] * d, dE + (prev[n] + 1) * d, 0.0f);
  }

  // ------------------------------------------------------------------ forward
  std::vector<uint8_t> real(N);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(id[n] >= 0 && id[n] < V, "token id out of range");
    real[n] = id[n] != pad_id;
  }
  Tensor x0 = reused("x0", {N, d}, opts);
  {
    const float* E = fp(params[0]);
    const float* P = fp(params[1]);
    float* x = fp(x0);
    for (int64_t n = 0; n < N; ++n) {
      const float* e = E + id[n] * d;
      const float* p = P + (n % L) * d;
      for (int64_t c = 0; c < d; ++c) x[n * d + c] = e[c] + p[c];
    }
  }
  Tensor q = linear(reused("q", {N, d}, opts), x0, params[2], params[3]);
  Tensor k = learns_keys ? linear(reused("k", {N, d}, opts), x0, params[4], params[5]) : x0;
  Tensor xm;  // super: the value input with padded rows zeroed
  Tensor v;
  if (learns_values) {
    v = linear(reused("v", {N, d}, opts), x0, params[6], params[7]);
  } else if (!is_super) {
    v = x0;
  } else {  // super: V_b = W^A Xm_b (+ a bias per row) for each review b; Xm = X0 with padded rows zeroed
    xm = x0;
    if (padding_mask) {
      xm = reused("xm", {N, d}, opts);
      const float* x = fp(x0);
      float* out = fp(xm);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < d; ++c) out[n * d + c] = real[n] ? x[n * d + c] : 0.0f;
    }
    v = reused("v", {N, d}, opts);
    const float *wa = fp(params[10]), *xm_p = fp(xm);
    const float* bias = wa_bias ? fp(params[11]) : nullptr;
    const int64_t ld_wa = params[10].size(1);
    for (int64_t b = 0; b < B; ++b) {
      float* vb = fp(v) + b * L * d;
      gemm(L, d, L, {wa, ld_wa, 1}, xm_p + b * L * d, d, vb, d, nullptr, 0);
      if (bias)
        for (int64_t i = 0; i < L; ++i)
          for (int64_t c = 0; c < d; ++c) vb[i * d + c] += bias[i];
    }
  }
  const int64_t ldq = q.size(1), ldk = k.size(1), ldv = v.size(1);
  TORCH_CHECK(ldq == d && ldk == d && ldv == d, "q, k, v rows of width d_model");
  Tensor probs = reused("probs", {B, s.h, L, L}, opts);
  Tensor heads = reused("heads", {N, d}, opts);
  std::vector<float> scratch(std::max<int64_t>(s.dk * L, L * L));
  std::vector<uint8_t> allowed_bytes(L);
  bool* allowed = reinterpret_cast<bool*>(allowed_bytes.data());
  const float *qp = fp(q), *kp = fp(k), *vp = fp(v);
  float *probs_p = fp(probs), *heads_p = fp(heads);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < L; ++j) allowed[j] = !padding_mask || real[b * L + j];
    for (int64_t hh = 0; hh < s.h; ++hh) {
      const int64_t off = b * L * d + hh * s.dk;
      attention_forward(qp + off, kp + off, vp + off, allowed, over_queries, scale, probs_p + (b * s.h + hh) * L * L,
                        heads_p + off, s, scratch.data());
    }
  }
  Tensor att = linear(reused("att", {N, d}, opts), heads, params[8], params[9]);
  Tensor m1 = reused("m1", {N, d}, opts), m2 = reused("m2", {N, d}, opts);
  Tensor m3 = reused("m3", {B, d}, opts), m4 = reused("m4", {B, params[20].size(0)}, opts);
  dropout_scales(fp(m1), N * d, dropout_p, seed, step, 0);
  dropout_scales(fp(m2), N * d, dropout_p, seed, step, 1);
  dropout_scales(fp(m3), B * d, dropout_p, seed, step, 2);
  dropout_scales(fp(m4), m4.numel(), dropout_p, seed, step, 3);
  const Normed norm1 = residual_layer_norm("norm1", x0, att, m1, params[16], params[17], eps);
  const Tensor &z = norm1.out, &xhat1 = norm1.xhat, &rstd1 = norm1.rstd;
  Tensor f1 = linear(reused("f1", {N, params[12].size(0)}, opts), z, params[12], params[13]);
  Tensor a1 = reused("a1", f1.sizes(), opts);
  {
    const float* f = fp(f1);
    float* a = fp(a1);
    relu(f, a, f1.numel());
  }
  Tensor f2 = linear(reused("f2", {N, d}, opts), a1, params[14], params[15]);
  const Normed norm2 = residual_layer_norm("norm2", z, f2, m2, params[18], params[19], eps);
  const Tensor &x1 = norm2.out, &xhat2 = norm2.xhat, &rstd2 = norm2.rstd;
  // pooling weights: 1/L each, or 1/count over real tokens
  std::vector<float> pool_w(N);
  for (int64_t b = 0; b < B; ++b) {
    float count = 0.0f;
    for (int64_t l = 0; l < L; ++l) count += real[b * L + l];
    for (int64_t l = 0; l < L; ++l)
      pool_w[b * L + l] = masked_pooling ? (real[b * L + l] ? 1.0f / std::max(count, 1.0f) : 0.0f)
                                         : 1.0f / static_cast<float>(L);
  }
  Tensor hin = at::zeros({B, d}, opts);
  {
    float* p = fp(hin);
    const float* x = fp(x1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < d; ++c) p[(n / L) * d + c] += pool_w[n] * x[n * d + c];
    const float* m = fp(m3);
    for (int64_t i = 0; i < B * d; ++i) p[i] *= m[i];
  }
  Tensor g = at::addmm(params[21], hin, params[20].t());  // (B, hidden)
  Tensor ha = at::relu(g).mul_(m4);
  Tensor logits = at::addmm(params[23], ha, params[22].t()).view({B});
  if (!backward) return {logits};
  double loss = 0.0;
  Tensor dlogit = at::empty({B, 1}, opts);
  {
    const float* x = fp(logits);
    float* dl = fp(dlogit);
    for (int64_t b = 0; b < B; ++b) {
      loss += std::max(x[b], 0.0f) - x[b] * y[b] + std::log1p(std::exp(-std::fabs(x[b])));
      dl[b] = (1.0f / (1.0f + std::exp(-x[b])) - y[b]) / static_cast<float>(B);
    }
  }

  // ------------------------------------------------------------------ backward
  at::mm_out(grads[22], dlogit.t(), ha);
  at::sum_out(grads[23], dlogit, {0});
  Tensor dg = at::mm(dlogit, params[22]).mul_(m4).mul_(g > 0);
  at::mm_out(grads[20], dg.t(), hin);
  at::sum_out(grads[21], dg, {0});
  Tensor dpooled = at::mm(dg, params[20]).mul_(m3);  // (B, d)
  Tensor dx1 = reused("dx1", {N, d}, opts);
  {
    float* o = fp(dx1);
    const float* p = fp(dpooled);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < d; ++c) o[n * d + c] = p[(n / L) * d + c] * pool_w[n];
  }
  Tensor dr2 = reused("dr2", {N, d}, opts);
  layer_norm_backward(fp(dx1), fp(xhat2), fp(rstd2), fp(params[18]), fp(dr2), fp(grads[18]), fp(grads[19]), N, d);
  Tensor df2 = reused("df2", {N, d}, opts);
  multiply(fp(dr2), fp(m2), fp(df2), N * d);
  linear_param_grads(df2, a1, grads[14], grads[15]);
  Tensor df1 = reused("df1", f1.sizes(), opts);
  linear_input_grad(df2, params[14], fp(df1), nullptr);
  {
    const float* f = fp(f1);
    float* g = fp(df1);
    relu_backward(f, g, df1.numel());
  }
  linear_param_grads(df1, z, grads[12], grads[13]);
  Tensor dz = reused("dz", {N, d}, opts);
  linear_input_grad(df1, params[12], fp(dz), fp(dr2));
  Tensor dr1 = reused("dr1", {N, d}, opts);
  layer_norm_backward(fp(dz), fp(xhat1), fp(rstd1), fp(params[16]), fp(dr1), fp(grads[16]), fp(grads[17]), N, d);
  Tensor datt = reused("datt", {N, d}, opts);
  multiply(fp(dr1), fp(m1), fp(datt), N * d);
  linear_param_grads(datt, heads, grads[8], grads[9]);
  Tensor dheads = reused("dheads", {N, d}, opts);
  linear_input_grad(datt, params[8], fp(dheads), nullptr);
  Tensor dq = reused("dq", {N, d}, opts), dk = reused("dk", {N, d}, opts), dv = reused("dv", {N, d}, opts);
  std::vector<float> scratch2(L * L);
  const float* dheads_p = fp(dheads);
  float *dq_p = fp(dq), *dk_p = fp(dk), *dv_p = fp(dv);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hh = 0; hh < s.h; ++hh) {
      const int64_t off = b * L * d + hh * s.dk;
      attention_backward(qp + off, kp + off, vp + off, probs_p + (b * s.h + hh) * L * L, dheads_p + off, over_queries,
                         scale, dq_p + off, dk_p + off, dv_p + off, s, scratch.data(), scratch2.data());
    }
  // dx0 = dr1 (residual) + the projections' input gradients
  Tensor dx0 = reused("dx0", {N, d}, opts);
  linear_input_grad(dq, params[2], fp(dx0), fp(dr1));
  linear_param_grads(dq, x0, grads[2], grads[3]);
  if (learns_keys) {
    linear_param_grads(dk, x0, grads[4], grads[5]);
    linear_input_grad(dk, params[4], fp(dx0), fp(dx0));
  } else {
    dx0.add_(dk);
  }
  if (learns_values) {
    linear_param_grads(dv, x0, grads[6], grads[7]);
    linear_input_grad(dv, params[6], fp(dx0), fp(dx0));
  } else if (!is_super) {
    dx0.add_(dv);
  } else {  // super: dW^A = sum_b dV_b Xm_b^T, d bias = the row sums of every dV_b, dXm_b = W^A^T dV_b
    const float *wa = fp(params[10]), *xm_p = fp(xm);
    const int64_t ld_wa = params[10].size(1);
    float *dwa = fp(grads[10]), *dx0_p = fp(dx0);
    float* dbias = wa_bias ? fp(grads[11]) : nullptr;  // zeroed with the other gradients
    std::vector<float> xm_t(d * L), dxm(padding_mask ? L * d : 0);
    for (int64_t b = 0; b < B; ++b) {
      const float* dvb = dv_p + b * L * d;
      float* dxb = dx0_p + b * L * d;
      transpose_head(xm_p + b * L * d, d, L, d, 1.0f, xm_t.data());  // Xm_b^T (d x L)
      gemm(L, L, d, {dvb, d, 1}, xm_t.data(), L, dwa, ld_wa, b == 0 ? nullptr : dwa, ld_wa);
      if (dbias)
        for (int64_t i = 0; i < L; ++i) dbias[i] += lane_sum(dvb + i * d, d);
      if (!padding_mask) {
        gemm(L, d, L, {wa, 1, ld_wa}, dvb, d, dxb, d, dxb, d);
        continue;
      }
      gemm(L, d, L, {wa, 1, ld_wa}, dvb, d, dxm.data(), d, nullptr, 0);
      for (int64_t i = 0; i < L; ++i)
        if (real[b * L + i])
          for (int64_t c = 0; c < d; ++c) dxb[i * d + c] += dxm[i * d + c];
    }
  }
  {  // embeddings
    float* dE = fp(grads[0]);
    float* dP = fp(grads[1]);
    const float* g0 = fp(dx0);
    for (int64_t n = 0; n < N; ++n) {
      float* e = dE + id[n] * d;
      float* p = dP + (n % L) * d;
      for (int64_t c = 0; c < d; ++c) {
        e[c] += g0[n * d + c];
        p[c] += g0[n * d + c];
      }
    }
  }
  std::vector<Tensor> out{at::scalar_tensor(loss / static_cast<double>(B), opts), logits};
  if (want_masks) {
    for (const Tensor* mask : {&m1, &m2, &m3, &m4}) out.push_back(mask->clone());  // the buffers are reused
  }
  return out;
}

// One Adam step (Kingma & Ba; the update of torch.optim.Adam without weight decay) over every
// parameter, in place. The token embedding's gradient is zero outside the rows in `ids`, so
// there the update runs with g = 0 without reading the gradient: the same numbers, less memory.
namespace {
template <bool HasGrad>
void adam_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                 int64_t n, float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float step_size,
                 float bc2_sqrt, float eps) {
  for (int64_t i = 0; i < n; ++i) {  // m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= s m / (sqrt(v / bc2) + eps)
    const float grad = HasGrad ? g[i] : 0.0f;
    m[i] = m[i] * beta1 + grad * one_minus_beta1;
    v[i] = v[i] * beta2 + grad * grad * one_minus_beta2;
    p[i] = p[i] - step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps);
  }
}
}  // namespace

void adam_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avg,
               const std::vector<Tensor>& exp_avg_sq, const Tensor& ids, int64_t step, double lr, double beta1,
               double beta2, double eps) {
  TORCH_CHECK(step >= 1, "Adam steps count from 1");
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2), e = static_cast<float>(eps);
  const float c1 = static_cast<float>(1.0 - beta1), c2 = static_cast<float>(1.0 - beta2);
  for (size_t t = 0; t < params.size(); ++t) {
    const Tensor& p = params[t];
    if (p.numel() == 0) continue;
    if (t != 0) {
      adam_update<true>(fp(p), fp(grads[t]), fp(exp_avg[t]), fp(exp_avg_sq[t]), p.numel(), b1, c1, b2, c2,
                        step_size, bc2_sqrt, e);
      continue;
    }
    const int64_t rows = p.size(0), d = p.size(1);
    std::vector<uint8_t> touched(rows, 0);
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t n = 0; n < ids.numel(); ++n) touched[id[n]] = 1;
    float *pp = fp(p), *gp = fp(grads[t]), *mp = fp(exp_avg[t]), *vp = fp(exp_avg_sq[t]);
    for (int64_t r = 0; r < rows;) {  // runs of rows that all are, or all are not, in the batch
      int64_t end = r + 1;
      while (end < rows && touched[end] == touched[r]) ++end;
      const int64_t off = r * d, n = (end - r) * d;
      if (touched[r])
        adam_update<true>(pp + off, gp + off, mp + off, vp + off, n, b1, c1, b2, c2, step_size, bc2_sqrt, e);
      else
        adam_update<false>(pp + off, nullptr, mp + off, vp + off, n, b1, c1, b2, c2, step_size, bc2_sqrt, e);
      r = end;
    }
  }
}

// One epoch of pba.train.fit's loop without Python in between: for each batch of `order`, a
// train_step and an adam_step, accumulating the loss (the batch mean times its size, in double)
// and the count of correct predictions (logit > threshold against label > 0.5) as fit does.
// Returns them with the last batch's ids (the rows its embedding gradient may be non-zero in).
std::tuple<double, int64_t, Tensor> train_epoch(
    const Tensor& all_ids, const Tensor& all_labels, const Tensor& order, int64_t batch_size, Tensor previous_ids,
    const std::vector<Tensor>& params, std::vector<Tensor> grads, const std::vector<Tensor>& exp_avg,
    const std::vector<Tensor>& exp_avg_sq, int64_t variant, int64_t n_heads, bool over_queries, bool padding_mask,
    bool masked_pooling, int64_t pad_id, double ln_eps, double dropout_p, int64_t seed, int64_t first_step,
    int64_t first_adam_step, double lr, double beta1, double beta2, double eps, double threshold) {
  TORCH_CHECK(batch_size > 0, "batch_size must be positive");
  double loss_sum = 0.0;
  int64_t correct = 0;
  const int64_t n = order.numel();
  int64_t step = first_step, adam = first_adam_step;
  for (int64_t begin = 0; begin < n; begin += batch_size) {
    const Tensor batch = order.narrow(0, begin, std::min(batch_size, n - begin));
    const Tensor ids = all_ids.index_select(0, batch);
    const Tensor labels = all_labels.index_select(0, batch);
    const std::vector<Tensor> out = train_step(ids, previous_ids, labels, params, grads, variant, n_heads, over_queries,
                                               padding_mask, masked_pooling, pad_id, ln_eps, dropout_p, seed, step++,
                                               false, true);
    adam_step(params, grads, exp_avg, exp_avg_sq, ids, ++adam, lr, beta1, beta2, eps);
    const int64_t size = batch.numel();
    loss_sum += static_cast<double>(out[0].item<float>()) * static_cast<double>(size);
    const float* logit = out[1].data_ptr<float>();
    const float* label = labels.data_ptr<float>();
    for (int64_t b = 0; b < size; ++b) correct += (logit[b] > static_cast<float>(threshold)) == (label[b] > 0.5f);
    previous_ids = ids;
  }
  return {loss_sum, correct, previous_ids};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_epoch", &train_epoch, "One epoch of training steps and Adam steps; loss sum, correct count, last ids");
  m.def("train_step", &train_step, "One IMDBClassifier training step: loss, logits; gradients into grads");
  m.def("adam_step", &adam_step, "Adam over every parameter, in place");
}

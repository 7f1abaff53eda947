// The training step of pba.models.IMDBClassifier (one encoder block) on the CPU, forward and
// backward written out by hand in the manner of llm.c's train_gpt2.c: the PyTorch model is the
// specification, this file a faster way to compute the same function and its gradient.
//
// Reading order, as in llm.c:
//   1. kernels: dropout's hash, exp, the register-tiled gemm, one (review, head)'s attention core;
//   2. layers: a forward and a backward function for each layer, in matching pairs
//      (embedding, matmul, token_mix, attention, residual, layernorm, relu, pool, head, bce);
//   3. the model: ParameterTensors (the one list of parameters, PBA_PARAMETERS, which also lays out
//      the gradients and Adam's moments), Options, ActivationTensors (PBA_ACTIVATIONS), and
//      model_forward / model_backward calling the layers in order and in reverse;
//   4. training: train_step (zero_grad, forward with dropout, loss, backward), adam_step and
//      train_epoch; evaluation is model_forward without dropout (model_logits);
//   5. the Python bindings: Options, Model (owns its buffers), Adam, train_epoch.
//
// Layout: tokens n = b * L + l, rows of width d; head h owns columns [h * dk, (h + 1) * dk).
// Every matrix product (W^Q, W^K, W^V, W^O, the FFN, W^A, and the four products of the attention
// core of every (review, head) pair) goes through one small register-tiled gemm; the softmax, the
// layer norms, dropout, pooling and the loss are loops over data that fits in the L1 cache. The
// classifier head (B x d -> 6 -> 1) goes through ATen.
//
// Dropout draws one 32-bit hash per element from (seed, step, site, index): counter-based, so a
// step's masks depend on nothing but those numbers.
//
// One thread at a time per Model: its buffers are reused from call to call.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// ================================================================================ 1. kernels
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
void attention_head_forward(const float* q, const float* k, const float* v, const bool* allowed, bool over_queries,
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
void attention_head_backward(const float* q, const float* k, const float* v, const float* P, const float* d_out,
                             bool over_queries, float scale, float* dq, float* dkey, float* dv, const Shapes& s,
                             float* vT, float* __restrict__ dS) {
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

// ================================================================================= 2. layers
// Each forward writes its outputs (the first arguments) from its inputs; each backward writes or
// accumulates (as its comment says) the gradients of its inputs and parameters (the first
// arguments) from the gradient of its output. Activations are rows of N = B * L tokens.

// ---------------------------------------------------------------------------------- embedding
// x0[n] = E[ids[n]] + P[n % L], the block's input; real[n] = 1 for a real token, 0 for padding.
void embedding_forward(float* x0, float* real, const int64_t* ids, const float* E, const float* P, int64_t B,
                       int64_t L, int64_t d, int64_t vocab, int64_t pad_id) {
  const int64_t N = B * L;
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(ids[n] >= 0 && ids[n] < vocab, "token id out of range");
    real[n] = ids[n] != pad_id ? 1.0f : 0.0f;
  }
  for (int64_t n = 0; n < N; ++n) {
    const float* e = E + ids[n] * d;
    const float* p = P + (n % L) * d;
    for (int64_t c = 0; c < d; ++c) x0[n * d + c] = e[c] + p[c];
  }
}

// dE[ids[n]] += dx0[n] and dP[n % L] += dx0[n]
void embedding_backward(float* dE, float* dP, const float* dx0, const int64_t* ids, int64_t B, int64_t L, int64_t d) {
  for (int64_t n = 0; n < B * L; ++n) {
    float* e = dE + ids[n] * d;
    float* p = dP + (n % L) * d;
    for (int64_t c = 0; c < d; ++c) {
      e[c] += dx0[n * d + c];
      p[c] += dx0[n * d + c];
    }
  }
}

// ------------------------------------------------------------------------------------- matmul
// out = inp W^T + bias, an nn.Linear: inp (rows, in), W (n_out, in), out (rows, n_out).
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t rows, int64_t in,
                    int64_t n_out) {
  std::vector<float> weight_t(in * n_out);  // W^T (in x n_out): B's rows must be contiguous
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t i = 0; i < in; ++i) weight_t[i * n_out + o] = weight[o * in + i];
  gemm(rows, n_out, in, {inp, in, 1}, weight_t.data(), n_out, out, n_out, bias, 0);
}

// dW = dout^T inp and dbias = the column sums of dout (both written); dinp = dinp_plus + dout W,
// where dinp_plus is the gradient reaching inp by other paths (a residual, or the other
// projections of the same input: it may be dinp itself), or nullptr.
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, const float* dinp_plus, int64_t rows, int64_t in, int64_t n_out) {
  // dW in slices of 64 tokens (16 KiB of dout and inp at d = 32): each slice is read from L2 once
  // and reused from L1 by every tile of dW, instead of every tile streaming all of dout and inp
  constexpr int64_t kSlice = 64;
  for (int64_t k = 0; k < rows; k += kSlice)
    gemm(n_out, in, std::min(kSlice, rows - k), {dout + k * n_out, 1, n_out}, inp + k * in, in, dweight, in,
         k == 0 ? nullptr : dweight, in);
  std::fill(dbias, dbias + n_out, 0.0f);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t o = 0; o < n_out; ++o) dbias[o] += dout[n * n_out + o];
  gemm(rows, in, n_out, {dout, n_out, 1}, weight, in, dinp, in, dinp_plus, in);
}

// The backward of an identity map (keys or values that are X itself): dinp += dout.
void identity_backward(float* __restrict__ dinp, const float* __restrict__ dout, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dinp[i] += dout[i];
}

// ---------------------------------------------------------------------------------- token mix
// Super attention's values: V_b = W^A Xm_b (+ a bias per row) for each review b, with W^A's
// top-left L x L block (rows ld_wa apart) and Xm = X0 with padded rows zeroed into `xm` when
// padding_mask, else X0 itself (mix_input() says which).
void token_mix_forward(float* v, float* xm, const float* x0, const float* real, const float* wa, const float* bias,
                       int64_t ld_wa, bool padding_mask, int64_t B, int64_t L, int64_t d) {
  const float* input = x0;
  if (padding_mask) {
    for (int64_t n = 0; n < B * L; ++n)
      for (int64_t c = 0; c < d; ++c) xm[n * d + c] = real[n] != 0.0f ? x0[n * d + c] : 0.0f;
    input = xm;
  }
  for (int64_t b = 0; b < B; ++b) {
    float* vb = v + b * L * d;
    gemm(L, d, L, {wa, ld_wa, 1}, input + b * L * d, d, vb, d, nullptr, 0);
    if (bias)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t c = 0; c < d; ++c) vb[i * d + c] += bias[i];
  }
}

// dW^A = sum_b dV_b Xm_b^T (its top-left block written), d bias = the row sums of every dV_b
// (accumulated), and dx0 += (W^A)^T dV_b at the real tokens (all tokens without padding_mask).
void token_mix_backward(float* dx0, float* dwa, float* dbias, const float* dv, const float* input, const float* real,
                        const float* wa, int64_t ld_wa, bool padding_mask, int64_t B, int64_t L, int64_t d) {
  std::vector<float> xm_t(d * L), dxm(padding_mask ? L * d : 0);
  for (int64_t b = 0; b < B; ++b) {
    const float* dvb = dv + b * L * d;
    float* dxb = dx0 + b * L * d;
    transpose_head(input + b * L * d, d, L, d, 1.0f, xm_t.data());  // Xm_b^T (d x L)
    gemm(L, L, d, {dvb, d, 1}, xm_t.data(), L, dwa, ld_wa, b == 0 ? nullptr : dwa, ld_wa);
    if (dbias)
      for (int64_t i = 0; i < L; ++i) dbias[i] += lane_sum(dvb + i * d, d);
    if (!padding_mask) {
      gemm(L, d, L, {wa, 1, ld_wa}, dvb, d, dxb, d, dxb, d);
      continue;
    }
    gemm(L, d, L, {wa, 1, ld_wa}, dvb, d, dxm.data(), d, nullptr, 0);
    for (int64_t i = 0; i < L; ++i)
      if (real[b * L + i] != 0.0f)
        for (int64_t c = 0; c < d; ++c) dxb[i * d + c] += dxm[i * d + c];
  }
}

// ---------------------------------------------------------------------------------- attention
// Every (review, head): the weights probs (B, h, L, L) and the heads' outputs (N, d, head by
// head in columns) from q, k, v (N, d). With padding_mask no query reads a padded key.
void attention_forward(float* heads, float* probs, const float* q, const float* k, const float* v, const float* real,
                       bool padding_mask, bool over_queries, const Shapes& s) {
  const int64_t L = s.L, d = s.d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dk));
  std::vector<float> kT(s.dk * L);
  bool allowed[kMaxLength];
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t j = 0; j < L; ++j) allowed[j] = !padding_mask || real[b * L + j] != 0.0f;
    for (int64_t hh = 0; hh < s.h; ++hh) {
      const int64_t off = b * L * d + hh * s.dk;
      attention_head_forward(q + off, k + off, v + off, allowed, over_queries, scale, probs + (b * s.h + hh) * L * L,
                             heads + off, s, kT.data());
    }
  }
}

// dq, dk, dv (written) from dheads, for every (review, head).
void attention_backward(float* dq, float* dk, float* dv, const float* dheads, const float* q, const float* k,
                        const float* v, const float* probs, bool over_queries, const Shapes& s) {
  const int64_t L = s.L, d = s.d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.dk));
  std::vector<float> vT(s.dk * L), dS(L * L);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hh = 0; hh < s.h; ++hh) {
      const int64_t off = b * L * d + hh * s.dk;
      attention_head_backward(q + off, k + off, v + off, probs + (b * s.h + hh) * L * L, dheads + off, over_queries,
                              scale, dq + off, dk + off, dv + off, s, vT.data(), dS.data());
    }
}

// ----------------------------------------------------------------------------------- residual
// The block's residual with dropout on its branch: out = x + a * mask (mask: the dropout scales).
void residual_forward(float* out, const float* x, const float* a, const float* mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] + a[i] * mask[i];
}

// da = dout * mask. The gradient of x is dout itself: the caller hands it on (as dinp_plus).
void residual_backward(float* __restrict__ da, const float* __restrict__ dout, const float* __restrict__ mask,
                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) da[i] = dout[i] * mask[i];
}

// ---------------------------------------------------------------------------------- layernorm
// y = LayerNorm(r) (rows of width d), keeping xhat and rstd = 1 / std per row for the backward.
void layernorm_forward(float* __restrict__ y, float* __restrict__ xhat, float* __restrict__ rstd,
                       const float* __restrict__ r, const float* __restrict__ gamma, const float* __restrict__ beta,
                       int64_t rows, int64_t d, float eps) {
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

// dr (written) from dy; dgamma and dbeta accumulated.
void layernorm_backward(float* __restrict__ dr, float* __restrict__ dgamma, float* __restrict__ dbeta,
                        const float* __restrict__ dy, const float* __restrict__ xhat, const float* __restrict__ rstd,
                        const float* __restrict__ gamma, int64_t rows, int64_t d) {
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

// --------------------------------------------------------------------------------------- relu
// out = max(x, 0), eight lanes at a time
void relu_forward(float* __restrict__ out, const float* __restrict__ x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, max8(load8(x + i), v8f{}));
  for (; i < n; ++i) out[i] = std::max(x[i], 0.0f);
}

// g = 0 where x <= 0, in place: g enters as the gradient of the output, leaves as that of x
void relu_backward(float* __restrict__ g, const float* __restrict__ x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(g + i, load8(x + i) > 0.0f ? load8(g + i) : v8f{});
  for (; i < n; ++i) g[i] = x[i] > 0.0f ? g[i] : 0.0f;
}

// --------------------------------------------------------------------------------------- pool
// pooled[b] = mask[b] * sum_l w[b, l] x[b, l]: the mean over a review's L tokens, or over its
// real ones when `masked` (none: zero), then dropout (mask: the scales). w (N) is kept.
void pool_forward(float* pooled, float* w, const float* x, const float* real, const float* mask, bool masked,
                  int64_t B, int64_t L, int64_t d) {
  for (int64_t b = 0; b < B; ++b) {
    float count = 0.0f;
    for (int64_t l = 0; l < L; ++l) count += real[b * L + l];
    for (int64_t l = 0; l < L; ++l)
      w[b * L + l] = masked ? (real[b * L + l] != 0.0f ? 1.0f / std::max(count, 1.0f) : 0.0f)
                            : 1.0f / static_cast<float>(L);
  }
  std::fill(pooled, pooled + B * d, 0.0f);
  for (int64_t n = 0; n < B * L; ++n)
    for (int64_t c = 0; c < d; ++c) pooled[(n / L) * d + c] += w[n] * x[n * d + c];
  for (int64_t i = 0; i < B * d; ++i) pooled[i] *= mask[i];
}

// dx[n] = w[n] * dpooled[b] * mask[b]; dpooled is scaled by the mask in place on the way
void pool_backward(float* dx, float* dpooled, const float* w, const float* mask, int64_t B, int64_t L, int64_t d) {
  for (int64_t i = 0; i < B * d; ++i) dpooled[i] *= mask[i];
  for (int64_t n = 0; n < B * L; ++n)
    for (int64_t c = 0; c < d; ++c) dx[n * d + c] = dpooled[(n / L) * d + c] * w[n];
}

// --------------------------------------------------------------------------------------- head
// The classifier head on the pooled vectors (B, d): g = pooled W1^T + b1 (B, hidden),
// ha = ReLU(g) * mask (dropout), logits = ha W2^T + b2 (B). Its products are tiny and go through
// ATen (at::addmm, at::mm), as the PyTorch model's do.
Tensor as_tensor(const float* p, at::IntArrayRef shape) {  // a view of a buffer, for ATen
  return at::from_blob(const_cast<float*>(p), shape, at::TensorOptions().dtype(at::kFloat));
}

void head_forward(float* logits, float* g, float* ha, const float* pooled, const float* mask, const Tensor& w1,
                  const Tensor& b1, const Tensor& w2, const Tensor& b2, int64_t B) {
  const int64_t hidden = w1.size(0), d = w1.size(1);
  Tensor g_t = as_tensor(g, {B, hidden}), logits_t = as_tensor(logits, {B, 1});
  at::addmm_out(g_t, b1, as_tensor(pooled, {B, d}), w1.t());
  for (int64_t i = 0; i < B * hidden; ++i) ha[i] = std::max(g[i], 0.0f) * mask[i];
  at::addmm_out(logits_t, b2, as_tensor(ha, {B, hidden}), w2.t());
}

// dW2, db2, dW1, db1 (written) and dpooled (written) from dlogits; dg (B, hidden) is scratch.
void head_backward(float* dpooled, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2, float* dg, const float* dlogits,
                   const float* pooled, const float* g, const float* ha, const float* mask, const Tensor& w1,
                   const Tensor& w2, int64_t B) {
  const int64_t hidden = w1.size(0), d = w1.size(1);
  const Tensor dl = as_tensor(dlogits, {B, 1}), dg_t = as_tensor(dg, {B, hidden});
  at::mm_out(dw2, dl.t(), as_tensor(ha, {B, hidden}));
  at::sum_out(db2, dl, {0});
  const float* w2p = w2.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < hidden; ++j) {
      const int64_t i = b * hidden + j;
      dg[i] = dlogits[b] * w2p[j] * mask[i] * (g[i] > 0.0f ? 1.0f : 0.0f);
    }
  at::mm_out(dw1, dg_t.t(), as_tensor(pooled, {B, d}));
  at::sum_out(db1, dg_t, {0});
  Tensor dpooled_t = as_tensor(dpooled, {B, d});
  at::mm_out(dpooled_t, dg_t, w1);
}

// ---------------------------------------------------------------------------------------- bce
// The mean binary cross-entropy of logits x against labels y (summed in double).
double bce_forward(const float* x, const float* y, int64_t B) {
  double loss = 0.0;
  for (int64_t b = 0; b < B; ++b)
    loss += std::max(x[b], 0.0f) - x[b] * y[b] + std::log1p(std::exp(-std::fabs(x[b])));
  return loss / static_cast<double>(B);
}

// dlogits = (sigmoid(x) - y) / B
void bce_backward(float* dlogits, const float* x, const float* y, int64_t B) {
  for (int64_t b = 0; b < B; ++b) dlogits[b] = (1.0f / (1.0f + std::exp(-x[b])) - y[b]) / static_cast<float>(B);
}

// ================================================================================== 3. model
// The parameters, listed once: X(name, shape...) makes the member of ParameterTensors, the name
// Python fills it by (pba/fused/step.py maps the PyTorch model's parameter names onto these), the
// shape it must have and the order zero_grad and Adam visit them in. The gradients and Adam's two
// moments have the same layout. Sizes: V the vocabulary, l = context_length, d = d_model,
// dff = d_ff, hidden = the head's width. The optional ones are absent (undefined tensors) where
// the layer has none.
#define PBA_PARAMETERS(X)                                                        \
  X(token_embedding, V, d)                                                       \
  X(position_embedding, l, d)                                                    \
  X(wq, d, d) X(bq, d)                       /* W^Q                           */ \
  X(wk, d, d) X(bk, d)                       /* W^K, where learns_keys        */ \
  X(wv, d, d) X(bv, d)                       /* W^V, where learns_values      */ \
  X(wo, d, d) X(bo, d)                       /* W^O                           */ \
  X(wa, l, l) X(wa_bias, l)                  /* W^A (bias optional), where    */ \
                                             /* learns_token_mixing           */ \
  X(fc1_weight, dff, d) X(fc1_bias, dff)     /* the FFN                       */ \
  X(fc2_weight, d, dff) X(fc2_bias, d)                                           \
  X(ln1_weight, d) X(ln1_bias, d)            /* norm1                         */ \
  X(ln2_weight, d) X(ln2_bias, d)            /* norm2                         */ \
  X(head1_weight, hidden, d) X(head1_bias, hidden) /* the head                */ \
  X(head2_weight, 1, hidden) X(head2_bias, 1)

struct ParameterTensors {
#define PBA_MEMBER(name, ...) Tensor name;
  PBA_PARAMETERS(PBA_MEMBER)
#undef PBA_MEMBER
};
using GradTensors = ParameterTensors;  // one gradient per parameter, in the same layout

using Slot = Tensor ParameterTensors::*;

// f(name, slot) for every parameter, in the order of PBA_PARAMETERS
template <typename F>
void for_each_slot(F&& f) {
#define PBA_VISIT(name, ...) f(#name, &ParameterTensors::name);
  PBA_PARAMETERS(PBA_VISIT)
#undef PBA_VISIT
}

// The model's settings. pba/fused/step.py reads them off the PyTorch layers' own attributes.
struct Options {
  bool learns_keys = true;           // K = X W^K + b^K; else the keys are X's column slices
  bool learns_values = true;         // V = X W^V + b^V
  bool learns_token_mixing = false;  // V = W^A X (+ a bias per row); without either, V = X
  int64_t n_heads = 4;
  bool softmax_over_queries = false;  // the reference reimplementation's softmax(dim=1)
  bool padding_mask = true;           // no query reads a padded key
  bool masked_pooling = true;         // the mean is over real tokens only
  int64_t pad_id = 0;
  double layer_norm_eps = 1e-6;  // both layer norms'
  double dropout = 0.1;          // every dropout's rate, in training steps
  int64_t seed = 0;              // of the dropout masks
};

// Sizes read off the parameters' shapes.
struct Dims {
  int64_t vocab, max_length, d, dff, hidden;
};

// What the forward keeps for the backward, and the backward's own buffers: X(name, floats) for a
// batch of B reviews of L tokens (N = B * L), h heads.
#define PBA_ACTIVATIONS(X)                                                                  \
  X(real, N)                    /* 1 for a real token, 0 for padding                     */ \
  X(x0, N * d)                  /* token + position embedding: the block's input X       */ \
  X(q, N * d)                   /* X W^Q + b^Q                                           */ \
  X(k, N * d)                   /* X W^K + b^K, where learned (else the keys are X)      */ \
  X(xm, N * d)                  /* X with padded rows zeroed: W^A's input (padding_mask) */ \
  X(v, N * d)                   /* X W^V + b^V or W^A Xm (+ bias), where learned         */ \
  X(probs, N * h * L)           /* (B, h, L, L) attention weights                        */ \
  X(heads, N * d)               /* the heads' outputs, side by side                      */ \
  X(att, N * d)                 /* heads W^O + b^O                                       */ \
  X(mask1, N * d)               /* dropout scales on att                                 */ \
  X(r1, N * d)                  /* X + dropout(att)                                      */ \
  X(xhat1, N * d) X(rstd1, N)   /* norm1's normalised rows and 1 / std                   */ \
  X(z, N * d)                   /* norm1(r1)                                             */ \
  X(f1, N * dff) X(a1, N * dff) /* z W1 + b1, ReLU                                       */ \
  X(f2, N * d)                  /* a1 W2 + b2                                            */ \
  X(mask2, N * d)               /* dropout scales on f2                                  */ \
  X(r2, N * d)                  /* z + dropout(f2)                                       */ \
  X(xhat2, N * d) X(rstd2, N)   /* norm2's                                               */ \
  X(x1, N * d)                  /* norm2(r2): the block's output                         */ \
  X(pool_w, N)                  /* each token's weight in its review's mean              */ \
  X(mask3, B * d)               /* dropout scales on the mean                            */ \
  X(pooled, B * d)              /* the head's input                                      */ \
  X(g, B * hidden)              /* pooled W1^T + b1                                      */ \
  X(mask4, B * hidden)          /* dropout scales after the head's ReLU                  */ \
  X(ha, B * hidden)             /* ReLU(g) * mask4                                       */ \
  X(logits, B)                                                                              \
  /* the backward's: the gradients of the activations above */                              \
  X(dlogits, B) X(dg, B * hidden) X(dpooled, B * d) X(dx1, N * d) X(dr2, N * d)             \
  X(df2, N * d) X(da1, N * dff) X(dz, N * d) X(dr1, N * d) X(datt, N * d)                   \
  X(dheads, N * d) X(dq, N * d) X(dk, N * d) X(dv, N * d) X(dx0, N * d)

struct ActivationTensors {
#define PBA_MEMBER(name, size) float* name = nullptr;
  PBA_ACTIVATIONS(PBA_MEMBER)
#undef PBA_MEMBER
};

struct Model {
  ParameterTensors params;  // the PyTorch model's own tensors (Adam updates them in place)
  GradTensors grads;        // their .grad tensors, which every training step overwrites
  Options options;
  Dims dims;
  ActivationTensors acts;  // carved out of acts_memory, which is sized for the largest batch seen
  Tensor acts_memory;
  int64_t capacity_B = 0, capacity_L = 0;
  int64_t B = 0, L = 0;  // the last forward's batch
  Tensor ids;            // and its token ids
  Tensor last_ids;       // the last training step's ids: the embedding's gradient is zero outside them
  int64_t steps = 0;     // training steps taken; each draws its own dropout masks
};

float* fp_or_null(const Tensor& t) { return t.defined() ? fp(t) : nullptr; }

// Fill a ParameterTensors from {slot name: tensor}; a name that is no slot is an error.
ParameterTensors tensors_by_name(const std::map<std::string, Tensor>& named, const char* what) {
  ParameterTensors tensors;
  size_t found = 0;
  for_each_slot([&](const char* name, Slot slot) {
    const auto it = named.find(name);
    if (it == named.end()) return;
    const Tensor& t = it->second;
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), what, " '", name,
                "' must be a contiguous float32 tensor on the CPU");
    tensors.*slot = t;
    ++found;
  });
  if (found != named.size())
    for (const auto& item : named) {
      bool known = false;
      for_each_slot([&](const char* name, Slot) { known = known || item.first == name; });
      TORCH_CHECK(known, what, ": '", item.first, "' is not a parameter of the fused step");
    }
  return tensors;
}

Model make_model(const std::map<std::string, Tensor>& parameters, const std::map<std::string, Tensor>& gradients,
                 const Options& options) {
  Model model;
  model.params = tensors_by_name(parameters, "parameter");
  model.grads = tensors_by_name(gradients, "gradient");
  model.options = options;
  model.last_ids = at::empty({0}, at::kLong);
  const ParameterTensors& p = model.params;
  TORCH_CHECK(!(options.learns_values && options.learns_token_mixing),
              "values are either learned (W^V) or mixed (W^A), not both");
  for_each_slot([&](const char* name, Slot slot) {  // present exactly where the options say
    bool wanted = true, optional = false;
    if (slot == &ParameterTensors::wk || slot == &ParameterTensors::bk) wanted = options.learns_keys;
    if (slot == &ParameterTensors::wv || slot == &ParameterTensors::bv) wanted = options.learns_values;
    if (slot == &ParameterTensors::wa) wanted = options.learns_token_mixing;
    if (slot == &ParameterTensors::wa_bias) wanted = false, optional = options.learns_token_mixing;
    const bool given = (p.*slot).defined();
    TORCH_CHECK(given == wanted || (optional && given), "parameter '", name, "' ",
                given ? "given, but the options say the model has none" : "missing");
    TORCH_CHECK((model.grads.*slot).defined() == given, "gradient '", name, "' ",
                given ? "missing" : "given without its parameter");
  });
  TORCH_CHECK(p.token_embedding.dim() == 2 && p.fc1_weight.dim() == 2 && p.head1_weight.dim() == 2 &&
                  p.position_embedding.dim() == 2,
              "embeddings, the FFN's and the head's first weights must be matrices");
  Dims& dims = model.dims;
  dims.vocab = p.token_embedding.size(0);
  dims.d = p.token_embedding.size(1);
  dims.max_length = p.position_embedding.size(0);
  dims.dff = p.fc1_weight.size(0);
  dims.hidden = p.head1_weight.size(0);
  const int64_t V = dims.vocab, l = dims.max_length, d = dims.d, dff = dims.dff, hidden = dims.hidden;
  TORCH_CHECK(options.n_heads > 0 && d % options.n_heads == 0, "n_heads must divide d_model");
  const auto check_shape = [](const char* name, const Tensor& param, const Tensor& grad, at::IntArrayRef shape) {
    if (!param.defined()) return;
    TORCH_CHECK(param.sizes() == shape, "parameter '", name, "' has shape ", param.sizes(), ", expected ", shape);
    TORCH_CHECK(grad.sizes() == shape, "gradient '", name, "' has shape ", grad.sizes(), ", expected ", shape);
  };
#define PBA_CHECK_SHAPE(name, ...) check_shape(#name, p.name, model.grads.name, {__VA_ARGS__});
  PBA_PARAMETERS(PBA_CHECK_SHAPE)
#undef PBA_CHECK_SHAPE
  return model;
}

// Buffers for a batch of B x L tokens, carved out of one tensor; kept while batches fit in them.
void allocate_activations(Model& model, int64_t B, int64_t L) {
  if (B <= model.capacity_B && L <= model.capacity_L) return;
  B = std::max(B, model.capacity_B);
  L = std::max(L, model.capacity_L);
  const int64_t N = B * L, d = model.dims.d, dff = model.dims.dff, hidden = model.dims.hidden;
  const int64_t h = model.options.n_heads;
  const auto padded = [](int64_t floats) { return (floats + 15) / 16 * 16; };  // each on its own cache line
  int64_t total = 0;
#define PBA_COUNT(name, size) total += padded(size);
  PBA_ACTIVATIONS(PBA_COUNT)
#undef PBA_COUNT
  model.acts_memory = at::empty({total}, at::kFloat);
  float* next = model.acts_memory.data_ptr<float>();
#define PBA_CARVE(name, size) \
  model.acts.name = next;     \
  next += padded(size);
  PBA_ACTIVATIONS(PBA_CARVE)
#undef PBA_CARVE
  model.capacity_B = B;
  model.capacity_L = L;
}

Shapes shapes_of(const Model& model) {
  Shapes s;
  s.B = model.B;
  s.L = model.L;
  s.d = model.dims.d;
  s.h = model.options.n_heads;
  s.dk = s.d / s.h;
  s.N = s.B * s.L;
  return s;
}

// The attention's keys and values, and W^A's input: a buffer, or X itself where nothing changes it.
const float* keys(const Model& m) { return m.options.learns_keys ? m.acts.k : m.acts.x0; }
const float* values(const Model& m) {
  return m.options.learns_values || m.options.learns_token_mixing ? m.acts.v : m.acts.x0;
}
const float* mix_input(const Model& m) { return m.options.padding_mask ? m.acts.xm : m.acts.x0; }

void check_ids(const Model& model, const Tensor& ids) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(),
              "ids: a contiguous int64 (B, L) tensor");
  TORCH_CHECK(ids.size(1) <= model.dims.max_length && ids.size(1) <= kMaxLength, "ids longer than the position table");
}

// The forward pass: the logits into acts.logits and everything the backward needs into acts.
// `dropout` is the rate (0: evaluation); the masks are those of training step model.steps.
void model_forward(Model& model, const Tensor& ids, double dropout) {
  check_ids(model, ids);
  const int64_t B = ids.size(0), L = ids.size(1), N = B * L;
  allocate_activations(model, B, L);
  model.B = B;
  model.L = L;
  model.ids = ids;
  const ParameterTensors& p = model.params;
  const Options& o = model.options;
  const int64_t d = model.dims.d, dff = model.dims.dff, hidden = model.dims.hidden, step = model.steps;
  const float eps = static_cast<float>(o.layer_norm_eps);
  ActivationTensors& a = model.acts;

  embedding_forward(a.x0, a.real, ids.data_ptr<int64_t>(), fp(p.token_embedding), fp(p.position_embedding), B, L, d,
                    model.dims.vocab, o.pad_id);
  matmul_forward(a.q, a.x0, fp(p.wq), fp(p.bq), N, d, d);
  if (o.learns_keys) matmul_forward(a.k, a.x0, fp(p.wk), fp(p.bk), N, d, d);
  if (o.learns_values)
    matmul_forward(a.v, a.x0, fp(p.wv), fp(p.bv), N, d, d);
  else if (o.learns_token_mixing)
    token_mix_forward(a.v, a.xm, a.x0, a.real, fp(p.wa), fp_or_null(p.wa_bias), model.dims.max_length, o.padding_mask,
                      B, L, d);
  attention_forward(a.heads, a.probs, a.q, keys(model), values(model), a.real, o.padding_mask, o.softmax_over_queries,
                    shapes_of(model));
  matmul_forward(a.att, a.heads, fp(p.wo), fp(p.bo), N, d, d);
  dropout_scales(a.mask1, N * d, dropout, o.seed, step, 0);
  residual_forward(a.r1, a.x0, a.att, a.mask1, N * d);
  layernorm_forward(a.z, a.xhat1, a.rstd1, a.r1, fp(p.ln1_weight), fp(p.ln1_bias), N, d, eps);
  matmul_forward(a.f1, a.z, fp(p.fc1_weight), fp(p.fc1_bias), N, d, dff);
  relu_forward(a.a1, a.f1, N * dff);
  matmul_forward(a.f2, a.a1, fp(p.fc2_weight), fp(p.fc2_bias), N, dff, d);
  dropout_scales(a.mask2, N * d, dropout, o.seed, step, 1);
  residual_forward(a.r2, a.z, a.f2, a.mask2, N * d);
  layernorm_forward(a.x1, a.xhat2, a.rstd2, a.r2, fp(p.ln2_weight), fp(p.ln2_bias), N, d, eps);
  dropout_scales(a.mask3, B * d, dropout, o.seed, step, 2);
  pool_forward(a.pooled, a.pool_w, a.x1, a.real, a.mask3, o.masked_pooling, B, L, d);
  dropout_scales(a.mask4, B * hidden, dropout, o.seed, step, 3);
  head_forward(a.logits, a.g, a.ha, a.pooled, a.mask4, p.head1_weight, p.head1_bias, p.head2_weight, p.head2_bias, B);
}

// Clear the gradients that the backward accumulates into; the token embedding's only in the rows
// of the last training step (it is zero elsewhere), the rest whole.
void model_zero_grad(Model& model) {
  for_each_slot([&](const char*, Slot slot) {
    Tensor& grad = model.grads.*slot;
    if (slot != &ParameterTensors::token_embedding && grad.defined()) grad.zero_();
  });
  float* dE = fp(model.grads.token_embedding);
  const int64_t d = model.dims.d;
  const int64_t* rows = model.last_ids.data_ptr<int64_t>();
  for (int64_t n = 0; n < model.last_ids.numel(); ++n) std::fill(dE + rows[n] * d, dE + (rows[n] + 1) * d, 0.0f);
}

// The backward pass of the last forward from acts.dlogits: the layers' backwards in the reverse
// order of model_forward, into model.grads (cleared by model_zero_grad).
void model_backward(Model& model) {
  const ParameterTensors& p = model.params;
  GradTensors& g = model.grads;
  const Options& o = model.options;
  const int64_t B = model.B, L = model.L, N = B * L, d = model.dims.d, dff = model.dims.dff;
  ActivationTensors& a = model.acts;

  head_backward(a.dpooled, g.head1_weight, g.head1_bias, g.head2_weight, g.head2_bias, a.dg, a.dlogits, a.pooled, a.g,
                a.ha, a.mask4, p.head1_weight, p.head2_weight, B);
  pool_backward(a.dx1, a.dpooled, a.pool_w, a.mask3, B, L, d);
  layernorm_backward(a.dr2, fp(g.ln2_weight), fp(g.ln2_bias), a.dx1, a.xhat2, a.rstd2, fp(p.ln2_weight), N, d);
  residual_backward(a.df2, a.dr2, a.mask2, N * d);  // and z's share, dr2, joins dz below
  matmul_backward(a.da1, fp(g.fc2_weight), fp(g.fc2_bias), a.df2, a.a1, fp(p.fc2_weight), nullptr, N, dff, d);
  relu_backward(a.da1, a.f1, N * dff);
  matmul_backward(a.dz, fp(g.fc1_weight), fp(g.fc1_bias), a.da1, a.z, fp(p.fc1_weight), a.dr2, N, d, dff);
  layernorm_backward(a.dr1, fp(g.ln1_weight), fp(g.ln1_bias), a.dz, a.xhat1, a.rstd1, fp(p.ln1_weight), N, d);
  residual_backward(a.datt, a.dr1, a.mask1, N * d);  // and X's share, dr1, joins dx0 below
  matmul_backward(a.dheads, fp(g.wo), fp(g.bo), a.datt, a.heads, fp(p.wo), nullptr, N, d, d);
  attention_backward(a.dq, a.dk, a.dv, a.dheads, a.q, keys(model), values(model), a.probs, o.softmax_over_queries,
                     shapes_of(model));
  matmul_backward(a.dx0, fp(g.wq), fp(g.bq), a.dq, a.x0, fp(p.wq), a.dr1, N, d, d);
  if (o.learns_keys)
    matmul_backward(a.dx0, fp(g.wk), fp(g.bk), a.dk, a.x0, fp(p.wk), a.dx0, N, d, d);
  else
    identity_backward(a.dx0, a.dk, N * d);
  if (o.learns_values)
    matmul_backward(a.dx0, fp(g.wv), fp(g.bv), a.dv, a.x0, fp(p.wv), a.dx0, N, d, d);
  else if (o.learns_token_mixing)
    token_mix_backward(a.dx0, fp(g.wa), fp_or_null(g.wa_bias), a.dv, mix_input(model), a.real, fp(p.wa),
                       model.dims.max_length, o.padding_mask, B, L, d);
  else
    identity_backward(a.dx0, a.dv, N * d);
  embedding_backward(fp(g.token_embedding), fp(g.position_embedding), a.dx0, model.ids.data_ptr<int64_t>(), B, L, d);
}

// ============================================================================ 4. training
// One training step: clear the gradients, forward (with dropout when `dropout`), the mean loss,
// backward. Returns the loss; the logits stay in acts.logits, the gradients in model.grads.
double train_step(Model& model, const Tensor& ids, const Tensor& labels, bool dropout) {
  check_ids(model, ids);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == ids.size(0) && labels.scalar_type() == at::kFloat &&
                  labels.is_contiguous(),
              "labels: a contiguous float32 (B,) tensor");
  model_zero_grad(model);
  model_forward(model, ids, dropout ? model.options.dropout : 0.0);
  const float* y = labels.data_ptr<float>();
  const double loss = bce_forward(model.acts.logits, y, model.B);
  bce_backward(model.acts.dlogits, model.acts.logits, y, model.B);
  model_backward(model);
  model.last_ids = ids;
  ++model.steps;
  return loss;
}

// Evaluation: the forward without dropout; the logits (B).
Tensor model_logits(Model& model, const Tensor& ids) {
  model_forward(model, ids, 0.0);
  return as_tensor(model.acts.logits, {model.B}).clone();
}

// Adam (Kingma & Ba; torch.optim.Adam's update without weight decay) over every parameter.
struct Adam {
  ParameterTensors m, v;  // the first and second moments, one per parameter
  double lr, beta1, beta2, eps;
  int64_t steps = 0;
};

Adam make_adam(const Model& model, double lr, double beta1, double beta2, double eps) {
  Adam adam;
  adam.lr = lr;
  adam.beta1 = beta1;
  adam.beta2 = beta2;
  adam.eps = eps;
  for_each_slot([&](const char*, Slot slot) {
    const Tensor& param = model.params.*slot;
    if (!param.defined()) return;
    adam.m.*slot = at::zeros_like(param);
    adam.v.*slot = at::zeros_like(param);
  });
  return adam;
}

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

// One Adam step at rate lr over every parameter, in place, from the last training step's
// gradients. The token embedding's gradient is zero outside the rows of model.last_ids, so there
// the update runs with g = 0 without reading it: the same numbers, less memory traffic.
void adam_step(Model& model, Adam& adam, double lr) {
  const int64_t step = ++adam.steps;
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(adam.beta1, static_cast<double>(step))));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(adam.beta2, static_cast<double>(step))));
  const float b1 = static_cast<float>(adam.beta1), b2 = static_cast<float>(adam.beta2);
  const float c1 = static_cast<float>(1.0 - adam.beta1), c2 = static_cast<float>(1.0 - adam.beta2);
  const float e = static_cast<float>(adam.eps);
  for_each_slot([&](const char*, Slot slot) {
    const Tensor& param = model.params.*slot;
    if (!param.defined() || param.numel() == 0) return;
    float *p = fp(param), *g = fp(model.grads.*slot), *m = fp(adam.m.*slot), *v = fp(adam.v.*slot);
    if (slot != &ParameterTensors::token_embedding) {
      adam_update<true>(p, g, m, v, param.numel(), b1, c1, b2, c2, step_size, bc2_sqrt, e);
      return;
    }
    const int64_t rows = param.size(0), d = param.size(1);
    std::vector<uint8_t> touched(rows, 0);
    const int64_t* id = model.last_ids.data_ptr<int64_t>();
    for (int64_t n = 0; n < model.last_ids.numel(); ++n) touched[id[n]] = 1;
    for (int64_t r = 0; r < rows;) {  // runs of rows that all are, or all are not, in the batch
      int64_t end = r + 1;
      while (end < rows && touched[end] == touched[r]) ++end;
      const int64_t off = r * d, n = (end - r) * d;
      if (touched[r])
        adam_update<true>(p + off, g + off, m + off, v + off, n, b1, c1, b2, c2, step_size, bc2_sqrt, e);
      else
        adam_update<false>(p + off, nullptr, m + off, v + off, n, b1, c1, b2, c2, step_size, bc2_sqrt, e);
      r = end;
    }
  });
}

// One round of pba.train.fit's loop without Python in between: for each batch of `order` (sizes
// batch_sizes, consecutive), a train_step with dropout and an adam_step at lrs[i] (adam.lr where
// lrs is empty), accumulating the loss (the batch's float mean times its size, in double) and
// the count of correct predictions (logit > threshold against label > 0.5) as fit does.
std::tuple<double, int64_t> train_epoch(Model& model, Adam& adam, const Tensor& all_ids, const Tensor& all_labels,
                                        const Tensor& order, const std::vector<int64_t>& batch_sizes,
                                        const std::vector<double>& lrs, double threshold) {
  TORCH_CHECK(lrs.empty() || lrs.size() == batch_sizes.size(), "one learning rate per batch");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong, "order: an int64 (n,) tensor");
  int64_t total = 0;
  for (const int64_t size : batch_sizes) {
    TORCH_CHECK(size > 0, "batch sizes must be positive");
    total += size;
  }
  TORCH_CHECK(total == order.numel(), "the batch sizes must add up to the length of order");
  double loss_sum = 0.0;
  int64_t correct = 0, begin = 0;
  for (size_t i = 0; i < batch_sizes.size(); ++i) {
    const int64_t size = batch_sizes[i];
    const Tensor batch = order.narrow(0, begin, size);
    const Tensor ids = all_ids.index_select(0, batch);
    const Tensor labels = all_labels.index_select(0, batch);
    const double loss = train_step(model, ids, labels, true);
    adam_step(model, adam, lrs.empty() ? adam.lr : lrs[i]);
    loss_sum += static_cast<double>(static_cast<float>(loss)) * static_cast<double>(size);
    const float* logit = model.acts.logits;
    const float* label = labels.data_ptr<float>();
    for (int64_t b = 0; b < size; ++b) correct += (logit[b] > static_cast<float>(threshold)) == (label[b] > 0.5f);
    begin += size;
  }
  return {loss_sum, correct};
}

// ============================================================================ 5. bindings
// Model.train_step for Python: the loss (a float32 scalar) and the logits (B,), with want_masks
// also the four dropout masks' scales: after attention (N, d), after the FFN (N, d), on the
// pooled vectors (B, d) and after the head's ReLU (B, hidden).
std::vector<Tensor> train_step_for_python(Model& model, const Tensor& ids, const Tensor& labels, bool dropout,
                                          bool want_masks) {
  const double loss = train_step(model, ids, labels, dropout);
  const ActivationTensors& a = model.acts;
  const int64_t B = model.B, N = B * model.L, d = model.dims.d, hidden = model.dims.hidden;
  std::vector<Tensor> out{at::scalar_tensor(loss, at::TensorOptions().dtype(at::kFloat)),
                          as_tensor(a.logits, {B}).clone()};
  if (want_masks)
    for (const auto& [mask, rows, width] : {std::tuple{a.mask1, N, d}, std::tuple{a.mask2, N, d},
                                            std::tuple{a.mask3, B, d}, std::tuple{a.mask4, B, hidden}})
      out.push_back(as_tensor(mask, {rows, width}).clone());  // the buffers are reused
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The training step of pba.models.IMDBClassifier in C++ (pba.fused)";
  m.def(
      "parameter_names",
      [] {
        std::vector<std::string> names;
        for_each_slot([&](const char* name, Slot) { names.emplace_back(name); });
        return names;
      },
      "The parameter slots of the step (ParameterTensors), in order");
  py::class_<Options>(m, "Options", "The model's settings (see imdb_step.cpp)")
      .def(py::init<>())
      .def_readwrite("learns_keys", &Options::learns_keys)
      .def_readwrite("learns_values", &Options::learns_values)
      .def_readwrite("learns_token_mixing", &Options::learns_token_mixing)
      .def_readwrite("n_heads", &Options::n_heads)
      .def_readwrite("softmax_over_queries", &Options::softmax_over_queries)
      .def_readwrite("padding_mask", &Options::padding_mask)
      .def_readwrite("masked_pooling", &Options::masked_pooling)
      .def_readwrite("pad_id", &Options::pad_id)
      .def_readwrite("layer_norm_eps", &Options::layer_norm_eps)
      .def_readwrite("dropout", &Options::dropout)
      .def_readwrite("seed", &Options::seed);
  py::class_<Model>(m, "Model", "Parameters, gradients and options by name; owns its activation buffers")
      .def(py::init(&make_model), py::arg("parameters"), py::arg("gradients"), py::arg("options"))
      .def("train_step", &train_step_for_python, py::arg("ids"), py::arg("labels"), py::arg("dropout"),
           py::arg("want_masks") = false, "One training step: loss, logits (and the masks); gradients into grads")
      .def("forward", &model_logits, py::arg("ids"), "Evaluation: the logits without dropout")
      .def_readonly("steps", &Model::steps)
      .def_property(
          "last_ids", [](const Model& model) { return model.last_ids; },
          [](Model& model, const Tensor& ids) {
            TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "last_ids: a contiguous int64 tensor");
            TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 &&
                                             ids.max().item<int64_t>() < model.dims.vocab),
                        "last_ids: token ids out of range");
            model.last_ids = ids;
          },
          "The last training step's token ids: the embedding's gradient is zero outside their rows");
  py::class_<Adam>(m, "Adam", "Adam's moments and settings, for one Model")
      .def(py::init(&make_adam), py::arg("model"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"))
      .def(
          "step", [](Adam& adam, Model& model) { adam_step(model, adam, adam.lr); }, py::arg("model"),
          "One update of the model's parameters from its gradients")
      .def_readonly("steps", &Adam::steps);
  m.def("train_epoch", &train_epoch, py::arg("model"), py::arg("adam"), py::arg("ids"), py::arg("labels"),
        py::arg("order"), py::arg("batch_sizes"), py::arg("lrs"), py::arg("threshold"),
        "A round of training steps and Adam steps: (loss sum, correct count)");
}

// lst's CPU kernels for small side networks (pipeline/side/blocks/cpu_kernels.py loads them).
//
// Attention (native_attention.py): softmax(q k^T * scale + bias), dropped out by a keep mask and
// scaled by c, times v; and its backward, which recomputes the probabilities from q and k as fused
// attention kernels do. Why: a side network's heads are tiny (MiniLM's: 12 heads of dim 4), so
// torch's batched matmuls and softmax over [B, H, L, L] spend their time on per-row overhead and on
// the [B, H, L, L] temporaries. Here W = 16 (batch, head) pairs are computed side by side, one per
// vector lane: every step of the arithmetic (a score, a running max, an exp, a gradient) is one
// full-width vector operation over 16 pairs, with no row remainders and no horizontal reductions,
// and nothing of size [L, L] is stored. A group's q, k and v are gathered into lane order once.
//
// Dropout masks come as random int16 lanes (dropout.py's random_words), of which the low 15 bits count
// (random_lanes): a lane below the threshold t is dropped. The kernels compare them and keep the mask
// as bits for the backward. The attention
// mask's lanes run (group, query row, key, lane), 16 per (row, key); a last group of `valid` < 16
// pairs holds `valid` per (row, key). Its bits are in the same order.
//
// Hidden-state dropout (dropout.py): x * c where the lane is kept, 0 where dropped, and the mask
// as bits; its backward grad * c where kept. One pass each instead of torch's compare, multiply
// and masked fill (and the bool mask they keep).
//
// The lanes themselves (random_words): the outputs of torch's CPU generator (MT19937), 31 bits each,
// exactly what int32.random_() draws from it, and the generator left in the same state. Why:
// random_() runs MT19937 one output at a time through a per-element callback; a cached MiniLM side
// step draws ~20 masks of ~84 k words, and profiled at 8.6% of the step (~210 us a mask), all of it
// on one core. Here the state is regenerated 624 words at a time and tempered in vectors: 17 us
// against 138 us for 84 k words (session 33).
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/MT19937RNGEngine.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

constexpr int W = 16;  // (batch, head) pairs computed side by side, one per vector lane
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline v16 splat(float x) { return v16{} + x; }

// The mask of 16 random lanes (kept: low 15 bits >= t) as 16 bits, and a vector kept where its bit is
// set (else 0). With AVX-512 a compare into a mask register and a masked move; elsewhere lane by lane.
#if defined(__AVX512F__)
inline uint16_t keep_bits16(const int16_t* lanes, int32_t t) {
  __m256i raw;
  std::memcpy(&raw, lanes, sizeof(raw));
  const __m512i lv = _mm512_and_si512(_mm512_cvtepi16_epi32(raw), _mm512_set1_epi32(0x7fff));
  return static_cast<uint16_t>(_mm512_cmpge_epi32_mask(lv, _mm512_set1_epi32(t)));
}
inline v16 where_bits(uint16_t bits, v16 a) { return (v16)_mm512_maskz_mov_ps(bits, (__m512)a); }
#else
inline uint16_t keep_bits16(const int16_t* lanes, int32_t t) {
  uint16_t word = 0;
  for (int l = 0; l < W; ++l) word |= static_cast<uint16_t>((lanes[l] & 0x7fff) >= t) << l;
  return word;
}
inline v16 where_bits(uint16_t bits, v16 a) {
  const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vi16 on = ((vi16{} + static_cast<int32_t>(bits)) >> lane) & 1;
  return on != 0 ? a : v16{};
}
#endif

// exp(x) for x <= 0 (softmax after the row max is subtracted), Cephes' expf: ~1 ulp; 0 below -87
inline v16 exp_neg(v16 x) {
  const v16 lo = splat(-87.0f);
  const v16 xc = x < lo ? lo : x;
  const v16 t = xc * 1.44269504088896341f + 0.5f;
  vi16 n = __builtin_convertvector(t, vi16);  // toward zero; t > -126, so floor is n or n - 1
  n += (__builtin_convertvector(n, v16) > t);  // true is -1
  const v16 fx = __builtin_convertvector(n, v16);
  const v16 r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  const v16 z = r * r;
  v16 y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
           + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const v16 scale = (v16)((n + 127) << 23);
  return x < lo ? v16{} : y * scale;
}

struct View4 {
  float* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

View4 view4(const at::Tensor& t) {
  View4 v;
  v.p = t.data_ptr<float>();
  for (int i = 0; i < 4; ++i) v.s[i] = t.stride(i);
  return v;
}

inline void lane_offsets(const View4& v, int64_t t0, int64_t T, int64_t H, int64_t* off) {
  for (int l = 0; l < W; ++l) {
    const int64_t t = std::min(t0 + l, T - 1);
    off[l] = (t / H) * v.s[0] + (t % H) * v.s[1];
  }
}

// [L][D] lane vectors from a view's rows of the group's lanes
template <int D>
inline void gather(const View4& v, const int64_t* off, int64_t L, v16* out) {
  for (int64_t i = 0; i < L; ++i)
    for (int d = 0; d < D; ++d) {
      float tmp[W];
      const float* base = v.p + i * v.s[2] + d * v.s[3];
      for (int l = 0; l < W; ++l) tmp[l] = base[off[l]];
      std::memcpy(&out[i * D + d], tmp, sizeof(tmp));
    }
}

template <int D>
inline void scatter(const v16* in, const int64_t* off, int64_t L, int valid, const View4& v) {
  for (int64_t i = 0; i < L; ++i)
    for (int d = 0; d < D; ++d) {
      float tmp[W];
      std::memcpy(tmp, &in[i * D + d], sizeof(tmp));
      float* base = v.p + i * v.s[2] + d * v.s[3];
      for (int l = 0; l < valid; ++l) base[off[l]] = tmp[l];
    }
}

struct Extras {
  View4 bias;
  bool has_bias = false;
  const uint8_t* bits = nullptr;  // keep mask, bits in lane order (see keep_row)
  const int16_t* lanes = nullptr;  // or the random lanes it is drawn from (forward), in the same order
  uint8_t* bits_out = nullptr;  // where the forward writes the mask it drew from ``lanes``
  int32_t threshold = 0;  // a lane below it is dropped
  float c = 1.0f;
  float scale = 1.0f;
};

// the bias row i of the group's lanes, [Lk] lane vectors
inline void bias_row(const Extras& x, const int64_t* boff, int64_t i, int64_t Lk, v16* out) {
  for (int64_t j = 0; j < Lk; ++j) {
    float tmp[W];
    const float* base = x.bias.p + i * x.bias.s[2] + j * x.bias.s[3];
    for (int l = 0; l < W; ++l) tmp[l] = base[boff[l]];
    std::memcpy(&out[j], tmp, sizeof(tmp));
  }
}

// keep factors (c or 0) of row i, from the mask's bits or (forward) from its random lanes, whose
// bits then go to bits_out; lanes and bits run (group, i, j, lane); a last group of `valid` < W lanes
// holds `valid` per (i, j)
inline void keep_row(const Extras& x, int64_t g, int valid, int64_t i, int64_t Lq, int64_t Lk, v16* out) {
  const v16 c = splat(x.c);
  if (valid == W) {
    const int64_t at = (g * Lq + i) * Lk;  // in units of W lanes (16 bits, two bytes of mask)
    if (x.lanes) {
      const int16_t* ln = x.lanes + at * W;
      for (int64_t j = 0; j < Lk; ++j) {
        const uint16_t word = keep_bits16(ln + j * W, x.threshold);
        out[j] = where_bits(word, c);
        std::memcpy(x.bits_out + 2 * (at + j), &word, 2);
      }
      return;
    }
    const uint8_t* w = x.bits + 2 * at;
    for (int64_t j = 0; j < Lk; ++j) {
      uint16_t word;
      std::memcpy(&word, w + 2 * j, 2);
      out[j] = where_bits(word, c);
    }
    return;
  }
  const int64_t base = g * W * Lq * Lk + i * Lk * valid;
  for (int64_t j = 0; j < Lk; ++j) {
    float tmp[W] = {};
    for (int l = 0; l < valid; ++l) {
      const int64_t b = base + j * valid + l;
      bool on;
      if (x.lanes) {
        on = (x.lanes[b] & 0x7fff) >= x.threshold;
        const uint8_t bit = static_cast<uint8_t>(1u << (b & 7));
        x.bits_out[b >> 3] = on ? (x.bits_out[b >> 3] | bit) : (x.bits_out[b >> 3] & ~bit);
      } else {
        on = (x.bits[b >> 3] >> (b & 7)) & 1;
      }
      tmp[l] = on ? x.c : 0.0f;
    }
    std::memcpy(&out[j], tmp, sizeof(tmp));
  }
}

// row i's probabilities (before dropout) into p[Lk]
template <int D>
inline void row_probs(const v16* q, const v16* K, const v16* bias, int64_t Lk, float scale, v16* p) {
  v16 m = splat(-INFINITY);
  for (int64_t j = 0; j < Lk; ++j) {
    v16 s = q[0] * K[j * D];
    for (int d = 1; d < D; ++d) s += q[d] * K[j * D + d];
    s = bias ? s * scale + bias[j] : s * scale;
    p[j] = s;
    m = s > m ? s : m;
  }
  v16 sum{};
  for (int64_t j = 0; j < Lk; ++j) {
    const v16 e = exp_neg(p[j] - m);
    p[j] = e;
    sum += e;
  }
  const v16 inv = 1.0f / sum;
  for (int64_t j = 0; j < Lk; ++j) p[j] *= inv;
}

// One lane group's q, k and v gathered into lane order ([L][D] vectors), and its bias rows.
template <int D>
struct GroupInputs {
  const View4 &Q, &K, &V;
  const Extras& x;
  int64_t T, H, Lq, Lk;
  std::vector<v16> q, k, v, br;
  int64_t bo[W] = {};
  bool bias_rows;

  GroupInputs(const View4& Q_, const View4& K_, const View4& V_, const Extras& x_, int64_t T_, int64_t H_,
              int64_t Lq_, int64_t Lk_)
      : Q(Q_), K(K_), V(V_), x(x_), T(T_), H(H_), Lq(Lq_), Lk(Lk_), q(Lq_ * D), k(Lk_ * D), v(Lk_ * D), br(Lk_),
        bias_rows(x_.has_bias && x_.bias.s[2] != 0) {}

  // gathers group g; returns how many of its lanes are real pairs
  int load(int64_t g) {
    const int64_t t0 = g * W;
    int64_t off[W];
    lane_offsets(Q, t0, T, H, off);
    gather<D>(Q, off, Lq, q.data());
    lane_offsets(K, t0, T, H, off);
    gather<D>(K, off, Lk, k.data());
    lane_offsets(V, t0, T, H, off);
    gather<D>(V, off, Lk, v.data());
    if (x.has_bias) {
      lane_offsets(x.bias, t0, T, H, bo);
      if (!bias_rows) bias_row(x, bo, 0, Lk, br.data());  // one row for every query (a padding mask)
    }
    return static_cast<int>(std::min<int64_t>(W, T - t0));
  }

  // query row i's bias (nullptr: none)
  const v16* bias(int64_t i) {
    if (!x.has_bias) return nullptr;
    if (bias_rows) bias_row(x, bo, i, Lk, br.data());
    return br.data();
  }
};

template <int D>
void forward_groups(const View4& Q, const View4& K, const View4& V, const View4& O, const Extras& x, int64_t T,
                    int64_t H, int64_t Lq, int64_t Lk, int64_t g0, int64_t g1) {
  GroupInputs<D> in(Q, K, V, x, T, H, Lq, Lk);
  std::vector<v16> o(Lq * D), p(Lk), kp(Lk);
  int64_t oo[W];
  for (int64_t g = g0; g < g1; ++g) {
    const int valid = in.load(g);
    lane_offsets(O, g * W, T, H, oo);
    for (int64_t i = 0; i < Lq; ++i) {
      row_probs<D>(&in.q[i * D], in.k.data(), in.bias(i), Lk, x.scale, p.data());
      if (x.bits || x.lanes) {
        keep_row(x, g, valid, i, Lq, Lk, kp.data());
        for (int64_t j = 0; j < Lk; ++j) p[j] *= kp[j];
      }
      v16 acc[D];
      for (int d = 0; d < D; ++d) acc[d] = p[0] * in.v[d];
      for (int64_t j = 1; j < Lk; ++j)
        for (int d = 0; d < D; ++d) acc[d] += p[j] * in.v[j * D + d];
      for (int d = 0; d < D; ++d) o[i * D + d] = acc[d];
    }
    scatter<D>(o.data(), oo, Lq, valid, O);
  }
}

template <int D>
void backward_groups(const View4& G, const View4& Q, const View4& K, const View4& V, const View4& GQ, const View4& GK,
                     const View4& GV, const Extras& x, int64_t T, int64_t H, int64_t Lq, int64_t Lk, int64_t g0,
                     int64_t g1) {
  GroupInputs<D> in(Q, K, V, x, T, H, Lq, Lk);
  const std::vector<v16>& q = in.q;
  const std::vector<v16>& k = in.k;
  const std::vector<v16>& v = in.v;
  std::vector<v16> go(Lq * D), gq(Lq * D), gk(Lk * D), gv(Lk * D), p(Lk), kp(Lk), gp(Lk);
  int64_t go_o[W], gqo[W], gko[W], gvo[W];
  const float scale = x.scale;
  for (int64_t g = g0; g < g1; ++g) {
    const int valid = in.load(g);
    const int64_t t0 = g * W;
    lane_offsets(G, t0, T, H, go_o);
    lane_offsets(GQ, t0, T, H, gqo);
    lane_offsets(GK, t0, T, H, gko);
    lane_offsets(GV, t0, T, H, gvo);
    gather<D>(G, go_o, Lq, go.data());
    std::fill(gk.begin(), gk.end(), v16{});
    std::fill(gv.begin(), gv.end(), v16{});
    for (int64_t i = 0; i < Lq; ++i) {
      const v16* qi = &q[i * D];
      const v16* gi = &go[i * D];
      row_probs<D>(qi, k.data(), in.bias(i), Lk, scale, p.data());
      if (x.bits) keep_row(x, g, valid, i, Lq, Lk, kp.data());
      v16 dot{};
      for (int64_t j = 0; j < Lk; ++j) {
        v16 s = gi[0] * v[j * D];
        for (int d = 1; d < D; ++d) s += gi[d] * v[j * D + d];
        v16 pd = p[j];
        if (x.bits) {
          s *= kp[j];
          pd *= kp[j];
        }
        for (int d = 0; d < D; ++d) gv[j * D + d] += pd * gi[d];
        gp[j] = s;
        dot += s * p[j];
      }
      v16 acc[D];
      v16 qs[D];
      for (int d = 0; d < D; ++d) {
        acc[d] = v16{};
        qs[d] = qi[d] * scale;
      }
      for (int64_t j = 0; j < Lk; ++j) {
        const v16 ds = (gp[j] - dot) * p[j];
        for (int d = 0; d < D; ++d) {
          acc[d] += ds * k[j * D + d];
          gk[j * D + d] += ds * qs[d];
        }
      }
      for (int d = 0; d < D; ++d) gq[i * D + d] = acc[d] * scale;
    }
    scatter<D>(gq.data(), gqo, Lq, valid, GQ);
    scatter<D>(gk.data(), gko, Lk, valid, GK);
    scatter<D>(gv.data(), gvo, Lk, valid, GV);
  }
}

Extras extras(const c10::optional<at::Tensor>& bias, double scale, double c, const c10::optional<at::Tensor>& bits) {
  Extras x;
  x.has_bias = bias.has_value() && bias->defined();
  if (x.has_bias) x.bias = view4(*bias);
  if (bits.has_value() && bits->defined()) x.bits = bits->data_ptr<uint8_t>();
  x.c = static_cast<float>(c);
  x.scale = static_cast<float>(scale);
  return x;
}

#define LST_DISPATCH_D(D_, ...)                                            \
  switch (D_) {                                                            \
    case 4: { constexpr int D = 4; __VA_ARGS__; break; }                   \
    case 8: { constexpr int D = 8; __VA_ARGS__; break; }                   \
    case 16: { constexpr int D = 16; __VA_ARGS__; break; }                 \
    default: TORCH_CHECK(false, "head dim ", D_, " has no native kernel"); \
  }

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
           const c10::optional<at::Tensor>& bits) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, L, D]");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors only");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k and v must match q's batch, heads and head dim");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->sizes() == at::IntArrayRef({B, H, Lq, Lk}),
                "bias must be float32, expanded to [B, H, Lq, Lk]");
  if (bits.has_value() && bits->defined())
    TORCH_CHECK(bits->scalar_type() == at::kByte && bits->is_contiguous() && bits->numel() * 8 >= B * H * Lq * Lk,
                "bits must hold B * H * Lq * Lk mask bits (uint8, contiguous)");
}

// the forward over every lane group (checked inputs): [B, H, Lq, D] laid out [B, Lq, H, D]
at::Tensor run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Extras& x) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Dh = q.size(3), Lk = k.size(2), T = B * H;
  auto out = at::empty({B, Lq, H, Dh}, q.options()).transpose(1, 2);
  const View4 Qv = view4(q), Kv = view4(k), Vv = view4(v), Ov = view4(out);
  const int64_t groups = (T + W - 1) / W;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    LST_DISPATCH_D(Dh, forward_groups<D>(Qv, Kv, Vv, Ov, x, T, H, Lq, Lk, g0, g1));
  });
  return out;
}

}  // namespace

// q [B, H, Lq, D], k and v [B, H, Lk, D] (float32, any strides), bias expanded to [B, H, Lq, Lk] or
// None, bits the keep mask or None (no dropout). The output [B, H, Lq, D] is laid out [B, Lq, H, D],
// so that merging its heads is a view.
at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const c10::optional<at::Tensor>& bias, double scale, double c,
                   const c10::optional<at::Tensor>& bits) {
  check(q, k, v, bias, bits);
  return run_forward(q, k, v, extras(bias, scale, c, bits));
}

// The gradients of q, k and v, laid out [B, L, H, D] (as the projections the heads are views of).
std::vector<at::Tensor> backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const c10::optional<at::Tensor>& bias, double scale,
                                 double c, const c10::optional<at::Tensor>& bits) {
  check(q, k, v, bias, bits);
  TORCH_CHECK(go.sizes() == q.sizes() && go.scalar_type() == at::kFloat, "grad_out must be shaped as q");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Dh = q.size(3), Lk = k.size(2), T = B * H;
  auto gq = at::empty({B, Lq, H, Dh}, q.options()).transpose(1, 2);
  auto gk = at::empty({B, Lk, H, Dh}, q.options()).transpose(1, 2);
  auto gv = at::empty({B, Lk, H, Dh}, q.options()).transpose(1, 2);
  const View4 Gv = view4(go), Qv = view4(q), Kv = view4(k), Vv = view4(v), GQv = view4(gq), GKv = view4(gk),
               GVv = view4(gv);
  const Extras x = extras(bias, scale, c, bits);
  const int64_t groups = (T + W - 1) / W;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    LST_DISPATCH_D(Dh, backward_groups<D>(Gv, Qv, Kv, Vv, GQv, GKv, GVv, x, T, H, Lq, Lk, g0, g1));
  });
  return {gq, gk, gv};
}

// forward() drawing its mask from random lanes (T * Lq * Lk int16, lane order) against `threshold`;
// returns the output and the mask's bits for backward().
std::vector<at::Tensor> forward_lanes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& bias, double scale, double c,
                                      const at::Tensor& lanes, int64_t threshold) {
  check(q, k, v, bias, c10::nullopt);
  const int64_t n = q.size(0) * q.size(1) * q.size(2) * k.size(2);
  TORCH_CHECK(lanes.scalar_type() == at::kShort && lanes.is_contiguous() && lanes.numel() >= n,
              "lanes must hold B * H * Lq * Lk int16 lanes (contiguous)");
  auto bits = at::zeros({(n + 7) / 8}, q.options().dtype(at::kByte));  // padding bits 0, as numpy's
  Extras x = extras(bias, scale, c, c10::nullopt);
  x.lanes = lanes.data_ptr<int16_t>();
  x.bits_out = bits.data_ptr<uint8_t>();
  x.threshold = static_cast<int32_t>(threshold);
  const at::Tensor out = run_forward(q, k, v, x);
  return {out, bits};
}

namespace {

// elements [i0, i1) of dropout's forward; i0 and i1 are multiples of 8 (or i1 = n): whole mask bytes
void dropout_span(const float* x, const int16_t* lanes, int32_t t, float c, float* out, uint8_t* bits, int64_t i0,
                  int64_t i1) {
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    v16 xv;
    std::memcpy(&xv, x + i, sizeof(xv));
    const uint16_t word = keep_bits16(lanes + i, t);
    const v16 y = where_bits(word, xv * c);
    std::memcpy(out + i, &y, sizeof(y));
    std::memcpy(bits + i / 8, &word, 2);
  }
  for (; i < i1; i += 8) {
    uint8_t byte = 0;
    for (int64_t e = i; e < std::min(i + 8, i1); ++e) {
      const bool on = (lanes[e] & 0x7fff) >= t;
      out[e] = on ? x[e] * c : 0.0f;
      byte |= static_cast<uint8_t>(on) << (e - i);
    }
    bits[i / 8] = byte;
  }
}

constexpr int64_t DROPOUT_GRAIN = 1 << 16;  // elements per parallel task (a multiple of 8)

}  // namespace

// Inverted dropout of x (float32): x * c where lane & 0x7fff >= threshold, else 0; and the mask's bits.
std::vector<at::Tensor> dropout_forward(const at::Tensor& x, const at::Tensor& lanes, int64_t threshold, double c) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32 CPU tensors only");
  TORCH_CHECK(lanes.scalar_type() == at::kShort && lanes.is_contiguous() && lanes.numel() >= x.numel(),
              "lanes must hold one int16 lane per element (contiguous)");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  auto out = at::empty_like(xc);
  auto bits = at::empty({(n + 7) / 8}, xc.options().dtype(at::kByte));
  const float* xp = xc.data_ptr<float>();
  const int16_t* lp = lanes.data_ptr<int16_t>();
  float* op = out.data_ptr<float>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  const float fc = static_cast<float>(c);
  const int32_t t = static_cast<int32_t>(threshold);
  at::parallel_for(0, (n + DROPOUT_GRAIN - 1) / DROPOUT_GRAIN, 1, [&](int64_t b0, int64_t b1) {
    dropout_span(xp, lp, t, fc, op, bp, b0 * DROPOUT_GRAIN, std::min(n, b1 * DROPOUT_GRAIN));
  });
  return {out, bits};
}

// grad * c where the mask's bit is set, else 0.
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& bits, double c) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.device().is_cpu(), "float32 CPU tensors only");
  const at::Tensor g = grad.contiguous();
  const int64_t n = g.numel();
  TORCH_CHECK(bits.scalar_type() == at::kByte && bits.is_contiguous() && bits.numel() * 8 >= n,
              "bits must hold one bit per element");
  auto out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const uint8_t* bp = bits.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const float fc = static_cast<float>(c);
  at::parallel_for(0, (n + DROPOUT_GRAIN - 1) / DROPOUT_GRAIN, 1, [&](int64_t b0, int64_t b1) {
    const int64_t i1 = std::min(n, b1 * DROPOUT_GRAIN);
    int64_t i = b0 * DROPOUT_GRAIN;
    for (; i + W <= i1; i += W) {
      uint16_t word;
      std::memcpy(&word, bp + i / 8, 2);
      v16 gv;
      std::memcpy(&gv, gp + i, sizeof(gv));
      const v16 y = where_bits(word, gv * fc);
      std::memcpy(op + i, &y, sizeof(y));
    }
    for (; i < i1; ++i) op[i] = ((bp[i >> 3] >> (i & 7)) & 1) ? gp[i] * fc : 0.0f;
  });
  return out;
}

// --- MT19937 words (random_words) -------------------------------------------------------------------
namespace {

constexpr int kMtN = 624, kMtM = 397;
constexpr uint32_t kMatrixA = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;

inline uint32_t mt_twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((v & 1u) ? kMatrixA : 0u);
}

// at::mt19937::next_state, as loops the compiler vectorises: the first reads words not yet rewritten
// (i + 1, i + M), the second words rewritten at least N - M = 227 places earlier
void mt_next_state(uint32_t* s) {
  for (int i = 0; i < kMtN - kMtM; ++i) s[i] = s[i + kMtM] ^ mt_twist(s[i], s[i + 1]);
  for (int i = kMtN - kMtM; i < kMtN - 1; ++i) s[i] = s[i + kMtM - kMtN] ^ mt_twist(s[i], s[i + 1]);
  s[kMtN - 1] = s[kMtM - 1] ^ mt_twist(s[kMtN - 1], s[0]);
}

// at::mt19937's tempering, and int32.random_()'s reduction to [0, 2^31) (uniform_int: V % 2^31)
void mt_temper31(const uint32_t* s, int32_t* out, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    uint32_t y = s[i];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= (y >> 18);
    out[i] = static_cast<int32_t>(y & 0x7fffffffu);
  }
}

// n outputs of at::mt19937::operator() from its state d, which moves on as n calls move it. A call
// decrements left_, regenerates the state where that reaches 0 (left_ = N, next_ = 0), and reads word
// next_++: so left_ - 1 words are there to read before the next regeneration.
void mt_words(at::mt19937_data_pod& d, int32_t* out, int64_t n) {
  uint32_t* s = d.state_.data();
  for (int64_t done = 0; done < n;) {
    if (d.left_ <= 1) {
      mt_next_state(s);
      d.left_ = kMtN + 1;  // the call that regenerates decrements it too
      d.next_ = 0;
    }
    const int64_t k = std::min<int64_t>(d.left_ - 1, n - done);
    mt_temper31(s + d.next_, out + done, k);
    d.next_ += static_cast<uint32_t>(k);
    d.left_ -= static_cast<int>(k);
    done += k;
  }
}

}  // namespace

// int32 [n]: what torch.empty(n, dtype=int32).random_(generator=g) draws (None: the default CPU
// generator), the generator moved on as random_ moves it.
at::Tensor random_words(int64_t n, c10::optional<at::Generator> g) {
  TORCH_CHECK(n >= 0, "n must be >= 0");
  at::Generator gen = (g.has_value() && g->defined()) ? *g : at::detail::getDefaultCPUGenerator();
  auto* impl = at::check_generator<at::CPUGeneratorImpl>(gen);
  auto out = at::empty({n}, at::kInt);
  std::lock_guard<std::mutex> lock(impl->mutex_);  // as random_ holds it
  at::mt19937 engine = impl->engine();
  at::mt19937_data_pod d = engine.data();
  mt_words(d, out.data_ptr<int32_t>(), n);
  engine.set_data(d);
  impl->set_engine(engine);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is let go while a kernel runs: a fused sweep steps variants on several threads at once
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  m.def("forward_lanes", &forward_lanes, py::call_guard<py::gil_scoped_release>());
  m.def("dropout_forward", &dropout_forward, py::call_guard<py::gil_scoped_release>());
  m.def("dropout_backward", &dropout_backward, py::call_guard<py::gil_scoped_release>());
  m.def("random_words", &random_words, py::arg("n"), py::arg("generator") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.attr("lanes") = W;
}

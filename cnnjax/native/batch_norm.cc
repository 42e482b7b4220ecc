// BatchNorm's passes over the activations as XLA FFI custom calls on the CPU
// (cnnjax.native.batch_norm; the per-channel arithmetic between them stays in XLA, so the batch
// statistics can be summed across devices there).
//
// Activations are float32 with channels last, seen as R rows of C channels; `coef` is a (K, C)
// float32 array of per-channel coefficients; relu (int64 attribute) applies or masks a ReLU:
//   cnnjax_bn_sums(x)                       -> s (2, C)   s[0] = sum x, s[1] = sum x^2
//   cnnjax_bn_apply(x, coef(2))             -> y          y = act(x coef[0] + coef[1])
//   cnnjax_bn_apply_residual(x, coef(2), r) -> y          y = act(x coef[0] + coef[1] + r)
//   cnnjax_bn_grad_sums(gy, x, coef(2))     -> s (2, C)   s[0] = sum g, s[1] = sum g x, where
//                                                         g = gy, zero where x coef[0] + coef[1] <= 0 (relu)
//   cnnjax_bn_grad_sums_masked(gy, y, x)    -> s (2, C), g   the same sums, g = gy where y > 0, else 0
//   cnnjax_bn_grad_apply(g, x, coef(5))     -> dx         dx = g coef[0] + x coef[1] + coef[2], g zero
//                                                         where x coef[3] + coef[4] <= 0 (relu)
// Sums (over rows, per channel) run in float32 over 8 rows and in float64 beyond. Rows are split
// over XLA's intra-op threads (cnnjax::parallel_parts, cnnjax::part_count); the parts' sums are
// added in a fixed order, so a result does not depend on which thread ran what.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 64;             // rows summed in registers before adding to memory
constexpr int64_t kFloatRows = 8;              // of which summed in float32 before float64
constexpr int64_t kMinPartElements = 1 << 15;  // no part of a split pass is smaller

typedef float f4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));

inline f4 load4(const float* p) {
  f4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, f4 v) { __builtin_memcpy(p, &v, sizeof v); }
inline d4 wide(f4 v) { return __builtin_convertvector(v, d4); }

using Coef = const float* __restrict;

struct Rows {
  int64_t r = 0, c = 0;
};

// Rows and channels of an activation buffer, or an error naming what is wrong.
ffi::Error rows_of(const ffi::AnyBuffer::Dimensions& dims, Rows& rows) {
  if (dims.size() < 1) return ffi::Error::InvalidArgument("cnnjax bn: activations need a channel axis");
  rows.c = dims.back();
  rows.r = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows.r *= dims[i];
  return ffi::Error::Success();
}

ffi::Error check_coef(const ffi::AnyBuffer::Dimensions& dims, int64_t k, int64_t c) {
  if (dims.size() != 2 || dims[0] != k || dims[1] != c)
    return ffi::Error::InvalidArgument("cnnjax bn: coef must have shape (" + std::to_string(k) + ", " +
                                       std::to_string(c) + ")");
  return ffi::Error::Success();
}

ffi::Error check_same(const ffi::AnyBuffer::Dimensions& a, const ffi::AnyBuffer::Dimensions& b,
                      const char* what) {
  if (a.size() != b.size() || !std::equal(a.begin(), a.end(), b.begin()))
    return ffi::Error::InvalidArgument(std::string("cnnjax bn: ") + what + " must have the activations' shape");
  return ffi::Error::Success();
}

int64_t parts_for(const Rows& rows, ffi::ThreadPool& pool) {
  return cnnjax::part_count(pool, rows.r, (kMinPartElements + rows.c - 1) / std::max<int64_t>(rows.c, 1), 1);
}

// Runs body(part, begin, end) over the rows in k parts.
template <typename Body>
void for_rows(const Rows& rows, ffi::ThreadPool& pool, int64_t k, Body body) {
  cnnjax::parallel_parts(pool, k, [&](int64_t i) {
    int64_t begin, end;
    cnnjax::part_range(rows.r, k, i, begin, end);
    body(i, begin, end);
    return std::string();
  });
}

// Per-channel sums of two terms over the rows, written to out (2, C) in float32. Sums run in
// float32 over kFloatRows rows and in float64 beyond (the statistics subtract E[x]^2 from E[x^2],
// which long float32 sums spoil where a channel's mean is large against its spread: 64-row float32
// blocks moved a plain-20's gradients by 1.6%). term(r, j, a, b) sets a and b to the terms of row r
// at channels j..j+3; term1(r, j, a, b) those of channel j alone (C not a multiple of 4).
template <typename Term, typename Term1>
void channel_sums(const Rows& rows, ffi::ThreadPool& pool, float* out, Term term, Term1 term1) {
  const int64_t c = rows.c, k = parts_for(rows, pool);
  std::vector<double> partial(k * 2 * c, 0.0);
  for_rows(rows, pool, k, [&](int64_t part, int64_t begin, int64_t end) {
    double* __restrict sa = partial.data() + part * 2 * c;
    double* __restrict sb = sa + c;
    for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
      const int64_t r1 = std::min(end, r0 + kBlockRows);
      int64_t j = 0;
      for (; j + 8 <= c; j += 8) {  // two vectors of channels at once, accumulators in registers
        d4 a0 = {}, a1 = {}, b0 = {}, b1 = {};
        for (int64_t q0 = r0; q0 < r1; q0 += kFloatRows) {
          f4 fa0 = {}, fa1 = {}, fb0 = {}, fb1 = {};
          for (int64_t r = q0, q1 = std::min(r1, q0 + kFloatRows); r < q1; ++r) {
            f4 x0, y0, x1, y1;
            term(r, j, x0, y0);
            term(r, j + 4, x1, y1);
            fa0 += x0, fb0 += y0, fa1 += x1, fb1 += y1;
          }
          a0 += wide(fa0), b0 += wide(fb0), a1 += wide(fa1), b1 += wide(fb1);
        }
        for (int i = 0; i < 4; ++i)
          sa[j + i] += a0[i], sb[j + i] += b0[i], sa[j + 4 + i] += a1[i], sb[j + 4 + i] += b1[i];
      }
      for (; j + 4 <= c; j += 4) {
        d4 a0 = {}, b0 = {};
        for (int64_t q0 = r0; q0 < r1; q0 += kFloatRows) {
          f4 fa0 = {}, fb0 = {};
          for (int64_t r = q0, q1 = std::min(r1, q0 + kFloatRows); r < q1; ++r) {
            f4 x0, y0;
            term(r, j, x0, y0);
            fa0 += x0, fb0 += y0;
          }
          a0 += wide(fa0), b0 += wide(fb0);
        }
        for (int i = 0; i < 4; ++i) sa[j + i] += a0[i], sb[j + i] += b0[i];
      }
      for (; j < c; ++j) {
        double a0 = 0.0, b0 = 0.0;
        for (int64_t r = r0; r < r1; ++r) {
          float x0, y0;
          term1(r, j, x0, y0);
          a0 += x0, b0 += y0;
        }
        sa[j] += a0, sb[j] += b0;
      }
    }
  });
  for (int64_t j = 0; j < 2 * c; ++j) {
    double s = 0.0;
    for (int64_t part = 0; part < k; ++part) s += partial[part * 2 * c + j];
    out[j] = static_cast<float>(s);
  }
}

// An element-wise pass over the rows: body(r) handles row r.
template <typename Body>
void each_row(const Rows& rows, ffi::ThreadPool& pool, Body body) {
  for_rows(rows, pool, parts_for(rows, pool), [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

inline f4 mask4(f4 z, f4 g) { return z > 0.0f ? g : f4{}; }               // lanes where z > 0 keep g
inline float mask1(float z, float g) { return z > 0.0f ? g : 0.0f; }

// --- the handlers ---------------------------------------------------------------------------

ffi::Error bn_sums(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32, 2> s, ffi::ThreadPool pool) {
  Rows rows;
  if (auto e = rows_of(x.dimensions(), rows); !e.success()) return e;
  if (auto e = check_coef(s->dimensions(), 2, rows.c); !e.success()) return e;
  const float* __restrict xp = x.typed_data();
  const int64_t c = rows.c;
  channel_sums(
      rows, pool, s->typed_data(),
      [&](int64_t r, int64_t j, f4& a, f4& b) {
        a = load4(xp + r * c + j);
        b = a * a;
      },
      [&](int64_t r, int64_t j, float& a, float& b) {
        a = xp[r * c + j];
        b = a * a;
      });
  return ffi::Error::Success();
}

// y = act(x m + add (+ r)), one pass.
template <bool kRelu, bool kResidual>
void apply_rows(const Rows& rows, ffi::ThreadPool& pool, const float* __restrict xp, Coef m, Coef add,
                const float* __restrict rp, float* __restrict yp) {
  const int64_t c = rows.c;
  each_row(rows, pool, [&](int64_t r) {
    const float* __restrict xr = xp + r * c;
    float* __restrict yr = yp + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float z = xr[j] * m[j] + add[j];
      if (kResidual) z += rp[r * c + j];
      yr[j] = kRelu ? (z > 0.0f ? z : 0.0f) : z;
    }
  });
}

ffi::Error apply(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32, 2>& coef, const float* residual,
                 ffi::ResultBuffer<ffi::F32>& y, int64_t relu, ffi::ThreadPool& pool) {
  Rows rows;
  if (auto e = rows_of(x.dimensions(), rows); !e.success()) return e;
  if (auto e = check_coef(coef.dimensions(), 2, rows.c); !e.success()) return e;
  const float *xp = x.typed_data(), *m = coef.typed_data(), *add = m + rows.c;
  float* yp = y->typed_data();
  if (residual == nullptr)
    (relu ? apply_rows<true, false> : apply_rows<false, false>)(rows, pool, xp, m, add, nullptr, yp);
  else
    (relu ? apply_rows<true, true> : apply_rows<false, true>)(rows, pool, xp, m, add, residual, yp);
  return ffi::Error::Success();
}

ffi::Error bn_apply(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32, 2> coef, ffi::ResultBuffer<ffi::F32> y,
                    int64_t relu, ffi::ThreadPool pool) {
  return apply(x, coef, nullptr, y, relu, pool);
}

ffi::Error bn_apply_residual(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32, 2> coef, ffi::Buffer<ffi::F32> r,
                             ffi::ResultBuffer<ffi::F32> y, int64_t relu, ffi::ThreadPool pool) {
  if (auto e = check_same(x.dimensions(), r.dimensions(), "the residual"); !e.success()) return e;
  return apply(x, coef, r.typed_data(), y, relu, pool);
}

ffi::Error bn_grad_sums(ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32, 2> coef,
                        ffi::ResultBuffer<ffi::F32, 2> s, int64_t relu, ffi::ThreadPool pool) {
  Rows rows;
  if (auto e = rows_of(x.dimensions(), rows); !e.success()) return e;
  if (auto e = check_same(x.dimensions(), gy.dimensions(), "the output gradient"); !e.success()) return e;
  if (auto e = check_coef(coef.dimensions(), 2, rows.c); !e.success()) return e;
  if (auto e = check_coef(s->dimensions(), 2, rows.c); !e.success()) return e;
  const int64_t c = rows.c;
  const float* __restrict gp = gy.typed_data();
  const float* __restrict xp = x.typed_data();
  Coef m = coef.typed_data();
  Coef add = m + c;
  channel_sums(
      rows, pool, s->typed_data(),
      [&](int64_t r, int64_t j, f4& a, f4& b) {
        f4 xv = load4(xp + r * c + j), g = load4(gp + r * c + j);
        a = relu ? mask4(xv * load4(m + j) + load4(add + j), g) : g;
        b = a * xv;
      },
      [&](int64_t r, int64_t j, float& a, float& b) {
        float xv = xp[r * c + j], g = gp[r * c + j];
        a = relu ? mask1(xv * m[j] + add[j], g) : g;
        b = a * xv;
      });
  return ffi::Error::Success();
}

ffi::Error bn_grad_sums_masked(ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> x,
                               ffi::ResultBuffer<ffi::F32, 2> s, ffi::ResultBuffer<ffi::F32> g,
                               ffi::ThreadPool pool) {
  Rows rows;
  if (auto e = rows_of(x.dimensions(), rows); !e.success()) return e;
  if (auto e = check_same(x.dimensions(), gy.dimensions(), "the output gradient"); !e.success()) return e;
  if (auto e = check_same(x.dimensions(), y.dimensions(), "the output"); !e.success()) return e;
  if (auto e = check_coef(s->dimensions(), 2, rows.c); !e.success()) return e;
  const int64_t c = rows.c;
  const float* __restrict gp = gy.typed_data();
  const float* __restrict yp = y.typed_data();
  const float* __restrict xp = x.typed_data();
  float* __restrict out = g->typed_data();
  channel_sums(
      rows, pool, s->typed_data(),
      [&](int64_t r, int64_t j, f4& a, f4& b) {
        int64_t i = r * c + j;
        a = mask4(load4(yp + i), load4(gp + i));
        store4(out + i, a);
        b = a * load4(xp + i);
      },
      [&](int64_t r, int64_t j, float& a, float& b) {
        int64_t i = r * c + j;
        a = out[i] = mask1(yp[i], gp[i]);
        b = a * xp[i];
      });
  return ffi::Error::Success();
}

// dx = g' gm + x a + b, g' = g masked where x m + add <= 0 (kRelu).
template <bool kRelu>
void grad_apply_rows(const Rows& rows, ffi::ThreadPool& pool, const float* __restrict gp,
                     const float* __restrict xp, Coef gm, Coef a, Coef b, Coef m, Coef add, float* __restrict out) {
  const int64_t c = rows.c;
  each_row(rows, pool, [&](int64_t r) {
    const float* __restrict gr = gp + r * c;
    const float* __restrict xr = xp + r * c;
    float* __restrict o = out + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float g = gr[j], xv = xr[j];  // both loaded unconditionally, so the select vectorises
      if (kRelu) g = xv * m[j] + add[j] > 0.0f ? g : 0.0f;
      o[j] = g * gm[j] + xv * a[j] + b[j];
    }
  });
}

ffi::Error bn_grad_apply(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32, 2> coef,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t relu, ffi::ThreadPool pool) {
  Rows rows;
  if (auto e = rows_of(x.dimensions(), rows); !e.success()) return e;
  if (auto e = check_same(x.dimensions(), g.dimensions(), "the output gradient"); !e.success()) return e;
  if (auto e = check_coef(coef.dimensions(), 5, rows.c); !e.success()) return e;
  const int64_t c = rows.c;
  const float* gm = coef.typed_data();
  (relu ? grad_apply_rows<true> : grad_apply_rows<false>)(rows, pool, g.typed_data(), x.typed_data(), gm, gm + c,
                                                          gm + 2 * c, gm + 3 * c, gm + 4 * c, dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// Comma-free names for the bindings below (macro arguments).
using Any = ffi::Buffer<ffi::F32>;
using Matrix = ffi::Buffer<ffi::F32, 2>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_sums, bn_sums,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Ret<Matrix>()
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_apply, bn_apply,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Arg<Matrix>()
                                  .Ret<Any>()
                                  .Attr<int64_t>("relu")
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_apply_residual, bn_apply_residual,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Arg<Matrix>()
                                  .Arg<Any>()
                                  .Ret<Any>()
                                  .Attr<int64_t>("relu")
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_grad_sums, bn_grad_sums,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Arg<Any>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("relu")
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_grad_sums_masked, bn_grad_sums_masked,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Arg<Any>()
                                  .Arg<Any>()
                                  .Ret<Matrix>()
                                  .Ret<Any>()
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_bn_grad_apply, bn_grad_apply,
                              ffi::Ffi::Bind()
                                  .Arg<Any>()
                                  .Arg<Any>()
                                  .Arg<Matrix>()
                                  .Ret<Any>()
                                  .Attr<int64_t>("relu")
                                  .Ctx<ffi::ThreadPool>());

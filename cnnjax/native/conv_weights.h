// The filter gradient of a float32 NHWC convolution, computed directly (cnnjax.native): the kernel
// cnnjax_dnnl_conv_bwd_weights runs instead of oneDNN's where the CPU has AVX2 and FMA and
// conv_weights_supported says so (PERFORMANCE.md section 12: oneDNN 3.2's jit:avx2 filter
// gradient for channels-last tensors reached 38-45 GFLOP/s in a ResNet-56 step, its forward pass
// 57-77).
//
//   dw[kh, kw, c, o] = sum over n, i, j of x[n, i*sh + kh*dh - pt, j*sw + kw*dw - pl, c] dy[n, i, j, o]
//
// with x read as zero outside the image. For each tap (kh, kw), a tile of CB input channels by 8*OV
// output channels is accumulated in CB*OV vector registers over all of an image's output pixels
// (one broadcast of x and OV loads of dy per CB*OV fused multiply-adds), then added to dw. Images
// are taken one at a time, so an image's x and dy stay in cache across its taps and tiles.

#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CNNJAX_CONV_WEIGHTS_KERNEL 1
#else
#define CNNJAX_CONV_WEIGHTS_KERNEL 0
#endif

namespace cnnjax {

// One convolution's geometry, shared with the oneDNN calls of dnnl_conv.cc: x (n, h, w, c),
// kernel (kh, kw, c, o), y (n, ho, wo, o); strides, padding (top, bottom, left, right) and
// dilation as given (1 = none).
struct ConvShape {
  int64_t n, h, w, c, kh, kw, o, ho, wo;
  int64_t sh, sw, pt, pb, pl, pr, dh, dw;
};

// Output positions i in [0, out) that read input row i*s + off inside [0, size): [lo, hi), empty
// when hi <= lo.
inline void valid_range(int64_t out, int64_t size, int64_t s, int64_t off, int64_t& lo, int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = off > size - 1 ? 0 : std::min(out, (size - 1 - off) / s + 1);
}

// Whether conv_weights computes this convolution's filter gradient (else oneDNN does): output
// channels a multiple of 8; at least 8 input channels, so that every tile is 4-6 channels high;
// and a column stride of 1, so that consecutive pixels of x are read. oneDNN's was faster with 3
// input channels (a network's first layer) and with stride 2 (PERFORMANCE.md section 12).
inline bool conv_weights_supported(const ConvShape& g) {
  return CNNJAX_CONV_WEIGHTS_KERNEL && g.o % 8 == 0 && g.c >= 8 && g.sw == 1 && g.n > 0;
}

#if CNNJAX_CONV_WEIGHTS_KERNEL

// dw's tile [c0, c0 + CB) x [o0, o0 + 8*OV) at tap (kh, kw), summed over one image's pixels, then
// stored (first image of the part) or added.
template <int CB, int OV>
inline void conv_weights_tile(const ConvShape& g, const float* x, const float* dy, float* dw, int64_t kh,
                              int64_t kw, int64_t c0, int64_t o0, bool first) {
  __m256 acc[CB][OV];
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < OV; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t off_h = kh * g.dh - g.pt, off_w = kw * g.dw - g.pl, i0, i1, j0, j1;
  valid_range(g.ho, g.h, g.sh, off_h, i0, i1);
  valid_range(g.wo, g.w, g.sw, off_w, j0, j1);
  for (int64_t i = i0; i < i1; ++i) {
    const float* xr = x + ((i * g.sh + off_h) * g.w + off_w) * g.c + c0;
    const float* dr = dy + i * g.wo * g.o + o0;
    for (int64_t j = j0; j < j1; ++j) {
      const float* xp = xr + j * g.sw * g.c;
      const float* dp = dr + j * g.o;
      __m256 d[OV];
#pragma GCC unroll 4
      for (int v = 0; v < OV; ++v) d[v] = _mm256_loadu_ps(dp + 8 * v);
#pragma GCC unroll 8
      for (int u = 0; u < CB; ++u) {
        __m256 b = _mm256_broadcast_ss(xp + u);
#pragma GCC unroll 4
        for (int v = 0; v < OV; ++v) acc[u][v] = _mm256_fmadd_ps(b, d[v], acc[u][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < CB; ++u) {
    float* out = dw + ((kh * g.kw + kw) * g.c + c0 + u) * g.o + o0;
#pragma GCC unroll 4
    for (int v = 0; v < OV; ++v)
      _mm256_storeu_ps(out + 8 * v, first ? acc[u][v] : _mm256_add_ps(acc[u][v], _mm256_loadu_ps(out + 8 * v)));
  }
}

template <int OV>
inline void conv_weights_block(const ConvShape& g, const float* x, const float* dy, float* dw, int64_t kh,
                               int64_t kw, int64_t c0, int64_t cb, int64_t o0, bool first) {
  switch (cb) {  // 4 to 6 with at least 8 channels in blocks as even as they come
    case 4: return conv_weights_tile<4, OV>(g, x, dy, dw, kh, kw, c0, o0, first);
    case 5: return conv_weights_tile<5, OV>(g, x, dy, dw, kh, kw, c0, o0, first);
    default: return conv_weights_tile<6, OV>(g, x, dy, dw, kh, kw, c0, o0, first);
  }
}

// dw (KH, KW, C, O) of the g.n images of x (N, H, W, C) and dy (N, Ho, Wo, O); needs
// conv_weights_supported(g).
inline void conv_weights(const ConvShape& g, const float* x, const float* dy, float* dw) {
  constexpr int64_t kMaxBlock = 6;  // input channels per tile: 6 x 16 outputs = 12 accumulators
  int64_t blocks = (g.c + kMaxBlock - 1) / kMaxBlock;
  for (int64_t n = 0; n < g.n; ++n) {
    const float* xn = x + n * g.h * g.w * g.c;
    const float* dn = dy + n * g.ho * g.wo * g.o;
    for (int64_t kh = 0; kh < g.kh; ++kh)
      for (int64_t kw = 0; kw < g.kw; ++kw)
        for (int64_t b = 0, c0 = 0; b < blocks; ++b) {
          int64_t cb = g.c / blocks + (b < g.c % blocks ? 1 : 0);  // blocks as even as they come
          int64_t o0 = 0;
          for (; o0 + 16 <= g.o; o0 += 16) conv_weights_block<2>(g, xn, dn, dw, kh, kw, c0, cb, o0, n == 0);
          for (; o0 < g.o; o0 += 8) conv_weights_block<1>(g, xn, dn, dw, kh, kw, c0, cb, o0, n == 0);
          c0 += cb;
        }
  }
}

#else

inline void conv_weights(const ConvShape&, const float*, const float*, float*) {}

#endif

}  // namespace cnnjax

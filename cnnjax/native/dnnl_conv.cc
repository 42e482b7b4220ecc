// oneDNN convolutions as XLA FFI custom calls on the CPU (cnnjax.native).
//
// Three handlers, one per convolution pass, all float32, activations NHWC and kernels HWIO (the
// layouts cnnjax keeps throughout, so nothing is transposed around a call):
//   cnnjax_dnnl_conv_fwd          y  = conv(x, w)           x (N,H,W,C), w (KH,KW,C,O) -> y (N,Ho,Wo,O)
//   cnnjax_dnnl_conv_bwd_data     dx = d conv / d x (dy, w)  dy (N,Ho,Wo,O), w          -> dx (N,H,W,C)
//   cnnjax_dnnl_conv_bwd_weights  dw = d conv / d w (x, dy)  x, dy                      -> dw (KH,KW,C,O)
// Attributes: strides (2), padding (4: top, bottom, left, right), dilation (2), all int64 arrays;
// split_batch (int64): 1 splits the batch over XLA's intra-op threads, each part a single-threaded
// oneDNN call; 0 runs one call on oneDNN's own OpenMP threads. cnnjax_dnnl_conv_bwd_weights also
// takes direct (int64): 1 computes the filter gradient with conv_weights.h's kernel where it
// applies (split over XLA's threads whatever split_batch says), oneDNN elsewhere.
//
// oneDNN picks its own blocked weight layout; the kernel is reordered into it (and the filter
// gradient out of it) inside the call. Primitives are built once per shape and kept; every call
// uses its own scratchpad (user scratchpad mode), so concurrent calls from XLA's threads are safe.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "conv_weights.h"
#include "dnnl.hpp"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// From the OpenMP runtime oneDNN's CPU build runs on (libgomp; linked explicitly).
extern "C" int omp_get_max_threads();
extern "C" void omp_set_num_threads(int);

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

enum Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

using Geometry = cnnjax::ConvShape;

// A plan's key: the pass, single-threaded or not, and the whole geometry.
auto plan_key(const Geometry& g, int pass, bool single) {
  return std::make_tuple(pass, single, g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.ho, g.wo, g.sh, g.sw, g.pt, g.pb, g.pl,
                         g.pr, g.dh, g.dw);
}
using Key = decltype(plan_key(std::declval<Geometry>(), 0, false));

// While alive, oneDNN on this thread runs single-threaded (if `single`); a primitive must run with
// the thread count it was created with, so plans are made under the same setting.
struct OmpThreads {
  int saved = 0;
  explicit OmpThreads(bool single) {
    if (single) {
      saved = omp_get_max_threads();
      omp_set_num_threads(1);
    }
  }
  ~OmpThreads() {
    if (saved) omp_set_num_threads(saved);
  }
};

struct Plan {
  dnnl::primitive prim;
  dnnl::memory::desc weights_md;  // the primitive's (diff_)weights layout
  dnnl::memory::desc user_weights_md;  // HWIO
  bool reorder = false;
  dnnl::reorder weights_reorder;  // user -> primitive (fwd, bwd-data) or primitive -> user (bwd-w)
  dnnl::memory::desc scratchpad_md;
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

std::mutex plans_mutex;
std::map<Key, std::shared_ptr<Plan>>& plans() {
  static auto* m = new std::map<Key, std::shared_ptr<Plan>>();
  return *m;
}

// The plan's primitive from its descriptor; `weights` is the (diff_)weights layout it chose.
template <typename Primitive>
void keep(Plan& plan, const typename Primitive::primitive_desc& pd, const dnnl::memory::desc& weights) {
  plan.prim = Primitive(pd);
  plan.weights_md = weights;
  plan.scratchpad_md = pd.scratchpad_desc();
}

std::shared_ptr<Plan> make_plan(const Geometry& g, int pass, bool single) {
  OmpThreads threads(single);
  auto& eng = engine();
  dims src_dims = {g.n, g.c, g.h, g.w};
  dims wei_dims = {g.o, g.c, g.kh, g.kw};
  dims dst_dims = {g.n, g.o, g.ho, g.wo};
  dims strides = {g.sh, g.sw};
  dims dil = {g.dh - 1, g.dw - 1};
  dims pad_l = {g.pt, g.pl};
  dims pad_r = {g.pb, g.pr};
  dnnl::memory::desc src_md(src_dims, dt::f32, tag::nhwc);
  dnnl::memory::desc dst_md(dst_dims, dt::f32, tag::nhwc);
  dnnl::memory::desc any_wei(wei_dims, dt::f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  auto plan = std::make_shared<Plan>();
  plan->user_weights_md = dnnl::memory::desc(wei_dims, dt::f32, tag::hwio);
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src_md, any_wei,
      dst_md, strides, dil, pad_l, pad_r, attr);
  if (pass == kForward) {
    keep<dnnl::convolution_forward>(*plan, fwd_pd, fwd_pd.weights_desc());
  } else if (pass == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(eng, dnnl::algorithm::convolution_direct, src_md, any_wei,
                                                       dst_md, strides, dil, pad_l, pad_r, fwd_pd, attr);
    keep<dnnl::convolution_backward_data>(*plan, pd, pd.weights_desc());
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(eng, dnnl::algorithm::convolution_direct, src_md,
                                                          any_wei, dst_md, strides, dil, pad_l, pad_r, fwd_pd, attr);
    keep<dnnl::convolution_backward_weights>(*plan, pd, pd.diff_weights_desc());
  }
  plan->reorder = plan->weights_md != plan->user_weights_md;
  if (plan->reorder) {  // the kernel gradient leaves the primitive's layout; kernels enter it
    bool out = pass == kBackwardWeights;
    plan->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, out ? plan->weights_md : plan->user_weights_md, eng, out ? plan->user_weights_md : plan->weights_md));
  }
  return plan;
}

std::shared_ptr<Plan> get_plan(const Geometry& g, int pass, bool single) {
  auto key = plan_key(g, pass, single);
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    auto it = plans().find(key);
    if (it != plans().end()) return it->second;
  }
  auto plan = make_plan(g, pass, single);  // outside the lock: building may JIT-compile kernels
  std::lock_guard<std::mutex> lock(plans_mutex);
  return plans().emplace(key, plan).first->second;
}

// A grow-only, 64-byte aligned buffer per thread and purpose (reused across calls).
struct Buffer {
  void* data = nullptr;
  size_t size = 0;
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 63) / 64 * 64;
      data = std::aligned_alloc(64, size);
      if (data == nullptr) size = 0;
    }
    return data;
  }
  ~Buffer() { std::free(data); }
};

ffi::Error check_attrs(ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                       ffi::Span<const int64_t> dilation) {
  if (strides.size() != 2 || padding.size() != 4 || dilation.size() != 2) {
    return ffi::Error::InvalidArgument(
        "cnnjax dnnl conv: strides (2), padding (4) and dilation (2) attributes expected");
  }
  for (auto v : padding)
    if (v < 0) return ffi::Error::InvalidArgument("cnnjax dnnl conv: negative padding");
  for (int i = 0; i < 2; ++i)
    if (strides[i] < 1 || dilation[i] < 1)
      return ffi::Error::InvalidArgument("cnnjax dnnl conv: strides and dilation must be >= 1");
  return ffi::Error::Success();
}

Geometry geometry(ffi::AnyBuffer::Dimensions act, ffi::AnyBuffer::Dimensions out,
                  ffi::AnyBuffer::Dimensions wei, ffi::Span<const int64_t> strides,
                  ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  return Geometry{act[0], act[1], act[2], act[3], wei[0], wei[1], wei[3], out[1], out[2],
                  strides[0], strides[1], padding[0], padding[1], padding[2], padding[3],
                  dilation[0], dilation[1]};
}

// One oneDNN call over the whole of `g` on this thread (with oneDNN's OpenMP threads unless
// `single`). Throws on oneDNN errors.
void run_one(int pass, const Geometry& g, char* src, char* wei, char* dst, bool single) {
  auto plan = get_plan(g, pass, single);
  auto& eng = engine();
  thread_local dnnl::stream strm(eng);
  thread_local Buffer scratch, wbuf;
  dnnl::memory scratch_mem(plan->scratchpad_md, eng, scratch.get(plan->scratchpad_md.get_size()));
  dnnl::memory user_w(plan->user_weights_md, eng, wei);
  dnnl::memory prim_w = user_w;
  if (plan->reorder) prim_w = dnnl::memory(plan->weights_md, eng, wbuf.get(plan->weights_md.get_size()));
  dims src_dims = {g.n, g.c, g.h, g.w}, dst_dims = {g.n, g.o, g.ho, g.wo};
  dnnl::memory src_mem({src_dims, dt::f32, tag::nhwc}, eng, src);
  dnnl::memory dst_mem({dst_dims, dt::f32, tag::nhwc}, eng, dst);
  OmpThreads threads(single);
  bool grad_w = pass == kBackwardWeights;
  if (plan->reorder && !grad_w) plan->weights_reorder.execute(strm, user_w, prim_w);
  plan->prim.execute(strm, {{pass == kBackwardData ? DNNL_ARG_DIFF_SRC : DNNL_ARG_SRC, src_mem},
                            {grad_w ? DNNL_ARG_DIFF_WEIGHTS : DNNL_ARG_WEIGHTS, prim_w},
                            {pass == kForward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, dst_mem},
                            {DNNL_ARG_SCRATCHPAD, scratch_mem}});
  if (plan->reorder && grad_w) plan->weights_reorder.execute(strm, prim_w, user_w);
  strm.wait();
}

// Runs `f`; the message of what it threw ('' if nothing).
std::string guarded(const std::function<void()>& f) {
  try {
    f();
  } catch (const dnnl::error& e) {
    return std::string("cnnjax dnnl conv (oneDNN): ") + e.what();
  } catch (const std::exception& e) {
    return std::string("cnnjax dnnl conv: ") + e.what();
  }
  return "";
}

constexpr int64_t kMinPartImages = 8;

std::atomic<int64_t> direct_weights_calls{0};  // filter gradients computed by conv_weights.h (tests read it)

// The batch split into `k` parts run as single-threaded oneDNN calls on XLA's own intra-op
// threads (cnnjax::parallel_parts). Parts of the kernel gradient are summed at the end, in part
// order. With `direct_weights`, the filter gradient is conv_weights.h's where that applies (split
// the same way, also when oneDNN would run on its OpenMP threads).
ffi::Error run(int pass, const Geometry& g, void* src, void* wei, void* dst, ffi::ThreadPool& pool,
               int64_t split_batch, bool direct_weights = false) {
  bool direct = direct_weights && pass == kBackwardWeights && cnnjax::conv_weights_supported(g);
  if (direct) direct_weights_calls.fetch_add(1, std::memory_order_relaxed);
  // Parts of at least kMinPartImages images, and one per thread at least. The filter gradient
  // keeps one part per thread: its parts' gradients are summed, and finer parts measured no
  // faster (1.01x [0.86-1.54], ResNet-56, PERFORMANCE.md section 11).
  int64_t threads = pool.num_threads();
  int64_t k = !split_batch && !direct ? 1
              : pass == kBackwardWeights ? std::min<int64_t>(threads, g.n)
                                         : cnnjax::part_count(pool, g.n, kMinPartImages, threads);
  auto one = [&](const Geometry& part, char* ps, char* pw, char* pd, bool single) {
    if (!direct) return run_one(pass, part, ps, pw, pd, single);
    cnnjax::conv_weights(part, reinterpret_cast<const float*>(ps), reinterpret_cast<const float*>(pd),
                         reinterpret_cast<float*>(pw));
  };
  char *s = static_cast<char*>(src), *w = static_cast<char*>(wei), *d = static_cast<char*>(dst);
  if (k <= 1) {
    std::string error = guarded([&] { one(g, s, w, d, /*single=*/false); });
    return error.empty() ? ffi::Error::Success() : ffi::Error::Internal(error);
  }
  std::vector<std::vector<float>> partial_dw;  // parts 1..k-1 of the kernel gradient
  if (pass == kBackwardWeights) partial_dw.assign(k - 1, std::vector<float>(g.kh * g.kw * g.c * g.o));
  std::string error = cnnjax::parallel_parts(pool, k, [&](int64_t i) {
    int64_t begin, end;
    cnnjax::part_range(g.n, k, i, begin, end);
    Geometry part = g;
    part.n = end - begin;
    char* pw = pass == kBackwardWeights && i > 0 ? reinterpret_cast<char*>(partial_dw[i - 1].data()) : w;
    char *ps = s + begin * g.h * g.w * g.c * sizeof(float), *pd = d + begin * g.ho * g.wo * g.o * sizeof(float);
    return guarded([&] { one(part, ps, pw, pd, /*single=*/true); });
  });
  if (!error.empty()) return ffi::Error::Internal(error);
  if (pass == kBackwardWeights) {
    float* out = static_cast<float*>(wei);
    for (const auto& part : partial_dw)
      for (size_t j = 0; j < part.size(); ++j) out[j] += part[j];
  }
  return ffi::Error::Success();
}

// A handler's work: `act` is the input activation (x or dx), `out` the output one (y or dy), `wei`
// the kernel (w or dw), whichever of them is the result.
ffi::Error checked_run(int pass, ffi::AnyBuffer::Dimensions act, ffi::AnyBuffer::Dimensions out,
                       ffi::AnyBuffer::Dimensions wei, void* src, void* wei_data, void* dst,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                       ffi::Span<const int64_t> dilation, int64_t split_batch, ffi::ThreadPool& pool,
                       bool direct_weights = false) {
  if (auto e = check_attrs(strides, padding, dilation); !e.success()) return e;
  return run(pass, geometry(act, out, wei, strides, padding, dilation), src, wei_data, dst, pool, split_batch,
             direct_weights);
}

using Attrs = ffi::Span<const int64_t>;
using F32 = ffi::Buffer<ffi::F32, 4>;
using F32Result = ffi::ResultBuffer<ffi::F32, 4>;

ffi::Error conv_fwd(F32 x, F32 w, F32Result y, Attrs strides, Attrs padding, Attrs dilation, int64_t split,
                    ffi::ThreadPool pool) {
  return checked_run(kForward, x.dimensions(), y->dimensions(), w.dimensions(), x.untyped_data(),
                     w.untyped_data(), y->untyped_data(), strides, padding, dilation, split, pool);
}

ffi::Error conv_bwd_data(F32 dy, F32 w, F32Result dx, Attrs strides, Attrs padding, Attrs dilation,
                         int64_t split, ffi::ThreadPool pool) {
  return checked_run(kBackwardData, dx->dimensions(), dy.dimensions(), w.dimensions(), dx->untyped_data(),
                     w.untyped_data(), dy.untyped_data(), strides, padding, dilation, split, pool);
}

ffi::Error conv_bwd_weights(F32 x, F32 dy, F32Result dw, Attrs strides, Attrs padding, Attrs dilation,
                            int64_t split, int64_t direct, ffi::ThreadPool pool) {
  return checked_run(kBackwardWeights, x.dimensions(), dy.dimensions(), dw->dimensions(), x.untyped_data(),
                     dw->untyped_data(), dy.untyped_data(), strides, padding, dilation, split, pool, direct != 0);
}

}  // namespace

#define CNNJAX_CONV_ATTRS                          \
  ffi::Ffi::Bind()                                 \
      .Arg<ffi::Buffer<ffi::F32, 4>>()             \
      .Arg<ffi::Buffer<ffi::F32, 4>>()             \
      .Ret<ffi::Buffer<ffi::F32, 4>>()             \
      .Attr<ffi::Span<const int64_t>>("strides")   \
      .Attr<ffi::Span<const int64_t>>("padding")   \
      .Attr<ffi::Span<const int64_t>>("dilation")  \
      .Attr<int64_t>("split_batch")
#define CNNJAX_CONV_BINDING CNNJAX_CONV_ATTRS.Ctx<ffi::ThreadPool>()
#define CNNJAX_CONV_WEIGHTS_BINDING CNNJAX_CONV_ATTRS.Attr<int64_t>("direct").Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_dnnl_conv_fwd, conv_fwd, CNNJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_dnnl_conv_bwd_data, conv_bwd_data, CNNJAX_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_dnnl_conv_bwd_weights, conv_bwd_weights, CNNJAX_CONV_WEIGHTS_BINDING);

extern "C" const char* cnnjax_dnnl_version() {
  static std::string v = [] {
    auto* ver = dnnl_version();
    return std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  }();
  return v.c_str();
}

// Whether this build has conv_weights.h's filter gradient (AVX2 and FMA), and how many filter
// gradients it has computed in this process.
extern "C" int cnnjax_conv_weights_kernel() { return CNNJAX_CONV_WEIGHTS_KERNEL; }
extern "C" int64_t cnnjax_conv_weights_calls() { return direct_weights_calls.load(); }

// One-pass multi-tensor optimizer updates for XLA:CPU, called through XLA's FFI (custom_call api_version 4).
//
// Each handler takes the packed state of a group (p, m, v[, vhat]: one flat buffer of N elements each; a pack
// handler has the variables as one buffer per gradient instead), the runtime scalars as rank-0 float32 buffers,
// and K gradient buffers whose flattened concatenation is the packed gradient (so no gather is materialised).
// Results alias the state operands (input_output_aliases): the state is updated in place, in one read and one
// write of each array. Handlers: Adam/AdamW and tf-keras SGD with momentum, each for one buffer and for a pack.
//
// Numerics follow the StableHLO formulation that shardopt lowers (see update_loops.inc for the order): float32
// math, bfloat16 state loaded to float32 and rounded once (nearest even) when stored, constants folded as XLA
// folds them (the caller passes float32(1 - beta) as attributes), denormals flushed as XLA:CPU runs (FTZ and
// DAZ), and fused multiply-adds exactly where XLA:CPU's LLVM contracts them on a CPU with FMA.
//
// Threads come from XLA's intra-op pool (ffi::ThreadPool), split as parallel.inc says; operands.inc reads and
// checks the operands. The element loops are in update_loops.inc, compiled once per instruction set.

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SHARDOPT_X86 1
#else
#define SHARDOPT_X86 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace shardopt_kernels {

constexpr int kAbiVersion = 5;

struct Bf16 {
  uint16_t bits;
};

static inline float Load(float x) { return x; }
static inline float Load(Bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
static inline void Store(float* dst, float x) { *dst = x; }
// Round to nearest even, NaN kept quiet (as XLA's and ml_dtypes' convert): denormals are kept (XLA's convert
// is integer arithmetic, no DAZ).
static inline void Store(Bf16* dst, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  dst->bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}
// x rounded to the precision of T (bfloat16: nearest even), as float32.
template <typename T>
static inline float RoundAs(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    Bf16 b;
    Store(&b, x);
    return Load(b);
  }
}
// stablehlo.maximum: NaN in either operand gives NaN.
static inline float MaxNan(float a, float b) { return (a > b || a != a) ? a : b; }

struct AdamScalars {
  float c1, c2, alpha, eps, wd, lr, scale;
};
struct SgdScalars {
  float momentum, lr, wd, scale;
};

namespace baseline {
constexpr bool kFma = false;
}
#define SHARDOPT_ISA_NS baseline
#include "update_loops.inc"
#undef SHARDOPT_ISA_NS

#if SHARDOPT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2_fma {
constexpr bool kFma = true;
}
#define SHARDOPT_ISA_NS avx2_fma
#include "update_loops.inc"
#undef SHARDOPT_ISA_NS
#pragma GCC pop_options
#elif defined(__aarch64__)
// Every AArch64 CPU has FMA, and XLA:CPU contracts there too.
namespace avx2_fma {
constexpr bool kFma = true;
}
#define SHARDOPT_ISA_NS avx2_fma
#include "update_loops.inc"
#undef SHARDOPT_ISA_NS
#endif

// ---- ISA selection --------------------------------------------------------------------------------------

enum Isa : int { kBaseline = 0, kAvx2Fma = 1 };

static int DetectIsa() {
#if SHARDOPT_X86
  __builtin_cpu_init();
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2Fma : kBaseline;
#elif defined(__aarch64__)
  return kAvx2Fma;
#else
  return kBaseline;
#endif
}

static std::atomic<int> g_isa{DetectIsa()};

// Flush-to-zero and denormals-are-zero for the duration of a chunk, as XLA:CPU computes.
class ScopedFlushDenormal {
 public:
#if SHARDOPT_X86
  ScopedFlushDenormal() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~ScopedFlushDenormal() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  ScopedFlushDenormal() {}
#endif
};

#include "parallel.inc"
#include "operands.inc"

// ---- dispatch -------------------------------------------------------------------------------------------

// Calls f(S{}, G{}) with the C++ types of the state and gradient dtypes.
template <typename F>
static void WithTypes(ffi::DataType state, ffi::DataType grad, F&& f) {
  if (state == ffi::DataType::F32) {
    if (grad == ffi::DataType::F32) f(float{}, float{}); else f(float{}, Bf16{});
  } else {
    if (grad == ffi::DataType::F32) f(Bf16{}, float{}); else f(Bf16{}, Bf16{});
  }
}

template <bool B>
using Bool = std::integral_constant<bool, B>;
template <int I>
using Int = std::integral_constant<int, I>;

template <typename F>
static void WithFlags2(bool a, bool b, F&& f) {
  auto c2 = [&](auto x) { b ? f(x, Bool<true>{}) : f(x, Bool<false>{}); };
  a ? c2(Bool<true>{}) : c2(Bool<false>{});
}

// Calls f(Int<mode>{}) for a clip-scale mode 0 (none), 1 or 2 (the loops' kScale).
template <typename F>
static void WithScaleMode(int mode, F&& f) {
  if (mode == 2) f(Int<2>{}); else if (mode == 1) f(Int<1>{}); else f(Int<0>{});
}

static int ScaleMode(bool has_scale, bool float32_form) { return has_scale ? (float32_form ? 2 : 1) : 0; }

// Runs the Adam loops over the whole group (`p` as for RunPieces; m, v and vhat packed).
static void AdamRunAll(ffi::ThreadPool& pool, ffi::DataType st, ffi::DataType gt, bool amsgrad,
                       bool has_weight_decay, int scale_mode, const AdamScalars& k, int64_t n, const Segments& seg,
                       const std::vector<void*>& p, void* mp, void* vp, void* vhp) {
  const int isa = g_isa.load(std::memory_order_relaxed);
  WithTypes(st, gt, [&](auto s_tag, auto g_tag) {
    using S = decltype(s_tag);
    using G = decltype(g_tag);
    WithFlags2(amsgrad, has_weight_decay, [&](auto ams, auto wd) {
      WithScaleMode(scale_mode, [&](auto sc) {
        constexpr bool kAms = decltype(ams)::value, kWd = decltype(wd)::value;
        constexpr int kSc = decltype(sc)::value;
        auto run = isa == kAvx2Fma ? &avx2_fma::AdamRun<S, G, kAms, kWd, kSc> : &baseline::AdamRun<S, G, kAms, kWd, kSc>;
        S* M = static_cast<S*>(mp);
        S* V = static_cast<S*>(vp);
        S* VH = static_cast<S*>(vhp);
        RunPieces<S>(pool, n, seg, p, [&](S* P, int64_t at, int64_t count, const void* g, int64_t gat) {
          run(P, M + at, V + at, VH ? VH + at : nullptr, static_cast<const G*>(g) + gat, count, k);
        });
      });
    });
  });
}

// Runs the SGD loops over the whole group (`p` as for RunPieces; m packed).
static void SgdRunAll(ffi::ThreadPool& pool, ffi::DataType st, ffi::DataType gt, bool nesterov,
                      bool has_weight_decay, int scale_mode, const SgdScalars& k, int64_t n, const Segments& seg,
                      const std::vector<void*>& p, void* mp) {
  const int isa = g_isa.load(std::memory_order_relaxed);
  WithTypes(st, gt, [&](auto s_tag, auto g_tag) {
    using S = decltype(s_tag);
    using G = decltype(g_tag);
    WithFlags2(nesterov, has_weight_decay, [&](auto nes, auto wd) {
      WithScaleMode(scale_mode, [&](auto sc) {
        constexpr bool kNes = decltype(nes)::value, kWd = decltype(wd)::value;
        constexpr int kSc = decltype(sc)::value;
        auto run = isa == kAvx2Fma ? &avx2_fma::SgdRun<S, G, kNes, kWd, kSc> : &baseline::SgdRun<S, G, kNes, kWd, kSc>;
        S* M = static_cast<S*>(mp);
        RunPieces<S>(pool, n, seg, p, [&](S* P, int64_t at, int64_t count, const void* g, int64_t gat) {
          run(P, M + at, static_cast<const G*>(g) + gat, count, k);
        });
      });
    });
  });
}

// ---- Adam -----------------------------------------------------------------------------------------------

// Operands: p, m, v, then [vhat] alpha eps [lr] [scale] grad_0 ... grad_{K-1}; results p, m, v[, vhat].
static ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::AnyBuffer p, ffi::AnyBuffer m, ffi::AnyBuffer v,
                           ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> p_out,
                           ffi::Result<ffi::AnyBuffer> m_out, ffi::Result<ffi::AnyBuffer> v_out,
                           ffi::RemainingRets rest_out, float c1, float c2, bool amsgrad, bool has_weight_decay,
                           float weight_decay, bool has_scale, bool scale_contracted) {
  const ffi::DataType st = p.element_type();
  auto n = StateCount({&p, &m, &v}, "p, m, v");
  if (n.has_error()) return n.error();
  auto head = DecodeAdamHead(rest, st, *n, c1, c2, amsgrad, has_weight_decay, weight_decay, has_scale);
  if (head.has_error()) return head.error();
  Segments seg;
  auto gt = Gradients(rest, head->next, *n, &seg);
  if (gt.has_error()) return gt.error();

  void* pp = InPlace(p, p_out);
  void* mp = InPlace(m, m_out);
  void* vp = InPlace(v, v_out);
  void* vhp = nullptr;
  if (amsgrad) {
    auto vh = VhatResult(rest_out, *head);
    if (vh.has_error()) return vh.error();
    vhp = *vh;
  }
  AdamRunAll(pool, st, *gt, amsgrad, has_weight_decay, ScaleMode(has_scale, scale_contracted), head->k, *n, seg,
             {pp}, mp, vp, vhp);
  return ffi::Error::Success();
}

// The same update for a pack whose variables stay in buffers of their own (slots packed): operands m, v, then
// [vhat] alpha eps [lr] [scale] p_0 ... p_{K-1} grad_0 ... grad_{K-1}; results m, v, [vhat], p_0 ... p_{K-1}.
// Each p_j has grad_j's element count; their concatenation is the packed state m, v and vhat are laid out as.
static ffi::Error AdamPackImpl(ffi::ThreadPool pool, ffi::AnyBuffer m, ffi::AnyBuffer v, ffi::RemainingArgs rest,
                               ffi::Result<ffi::AnyBuffer> m_out, ffi::Result<ffi::AnyBuffer> v_out,
                               ffi::RemainingRets rest_out, float c1, float c2, bool amsgrad,
                               bool has_weight_decay, float weight_decay, bool has_scale, bool scale_contracted) {
  const ffi::DataType st = m.element_type();
  auto n = StateCount({&m, &v}, "m, v");
  if (n.has_error()) return n.error();
  auto head = DecodeAdamHead(rest, st, *n, c1, c2, amsgrad, has_weight_decay, weight_decay, has_scale);
  if (head.has_error()) return head.error();
  auto pack = DecodePack(rest, rest_out, head->next, amsgrad ? 1 : 0, st, *n);
  if (pack.has_error()) return pack.error();
  void* mp = InPlace(m, m_out);
  void* vp = InPlace(v, v_out);
  void* vhp = nullptr;
  if (amsgrad) {
    auto vh = VhatResult(rest_out, *head);
    if (vh.has_error()) return vh.error();
    vhp = *vh;
  }
  if (pack->p.empty()) return ffi::Error::Success();
  AdamRunAll(pool, st, pack->gt, amsgrad, has_weight_decay, ScaleMode(has_scale, scale_contracted), head->k, *n,
             pack->seg, pack->p, mp, vp, vhp);
  return ffi::Error::Success();
}

// ---- SGD with momentum ----------------------------------------------------------------------------------

// Operands: p, m, then lr [scale] grad_0 ... grad_{K-1}; results p, m.
static ffi::Error SgdImpl(ffi::ThreadPool pool, ffi::AnyBuffer p, ffi::AnyBuffer m, ffi::RemainingArgs rest,
                          ffi::Result<ffi::AnyBuffer> p_out, ffi::Result<ffi::AnyBuffer> m_out, float momentum,
                          bool nesterov, bool has_weight_decay, float weight_decay, bool has_scale,
                          bool scale_float32) {
  const ffi::DataType st = p.element_type();
  auto n = StateCount({&p, &m}, "p, m");
  if (n.has_error()) return n.error();
  SgdScalars k;
  auto next = DecodeSgdHead(rest, momentum, weight_decay, has_scale, &k);
  if (next.has_error()) return next.error();
  Segments seg;
  auto gt = Gradients(rest, *next, *n, &seg);
  if (gt.has_error()) return gt.error();
  void* pp = InPlace(p, p_out);
  void* mp = InPlace(m, m_out);
  SgdRunAll(pool, st, *gt, nesterov, has_weight_decay, ScaleMode(has_scale, scale_float32), k, *n, seg, {pp}, mp);
  return ffi::Error::Success();
}

// The same update for a pack whose variables stay in buffers of their own (m packed): operands m, then lr
// [scale] p_0 ... p_{K-1} grad_0 ... grad_{K-1}; results m, p_0 ... p_{K-1}.
static ffi::Error SgdPackImpl(ffi::ThreadPool pool, ffi::AnyBuffer m, ffi::RemainingArgs rest,
                              ffi::Result<ffi::AnyBuffer> m_out, ffi::RemainingRets rest_out, float momentum,
                              bool nesterov, bool has_weight_decay, float weight_decay, bool has_scale,
                              bool scale_float32) {
  const ffi::DataType st = m.element_type();
  auto n = StateCount({&m}, "m");
  if (n.has_error()) return n.error();
  SgdScalars k;
  auto next = DecodeSgdHead(rest, momentum, weight_decay, has_scale, &k);
  if (next.has_error()) return next.error();
  auto pack = DecodePack(rest, rest_out, *next, 0, st, *n);
  if (pack.has_error()) return pack.error();
  void* mp = InPlace(m, m_out);
  if (pack->p.empty()) return ffi::Error::Success();
  SgdRunAll(pool, st, pack->gt, nesterov, has_weight_decay, ScaleMode(has_scale, scale_float32), k, *n, pack->seg,
            pack->p, mp);
  return ffi::Error::Success();
}

// ---- sum of squares ------------------------------------------------------------------------------------

// The sum of squares of the flattened concatenation x of the operands (N elements), in the one order that
// shardopt's StableHLO formulation (passes/fixed_order_norm.py) also spells out, so both give the same bits:
//   W = min(kSumsqLanes, the power of two >= N) lanes, acc[w] = +0;
//   for b = 0, 1, ...: acc[w] = x[b*W + w] * x[b*W + w] + acc[w] for every b*W + w < N (one FMA where XLA:CPU
//   contracts it, as MulAdd); then W halves until one lane is left: acc[w] = acc[w] + acc[w + W/2].
// Threads split the lanes (each tile of kSumsqTile lanes runs through every b), so the order does not depend
// on the thread count. Squares are float32 (bfloat16 operands converted exactly).
constexpr int64_t kSumsqLanes = int64_t{1} << 16;  // must equal shardopt.kernels.calls.SUMSQ_LANES
constexpr int64_t kSumsqTile = 4096;

static int64_t SumsqWidth(int64_t n) {
  int64_t w = 1;
  while (w < n && w < kSumsqLanes) w *= 2;
  return w;
}

// Operands: g_0 ... g_{K-1}, all float32 or all bfloat16; result: the float32 scalar sum of their squares.
static ffi::Error SumsqImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out) {
  if (out->element_type() != ffi::DataType::F32 || out->element_count() != 1)
    return ffi::Error::InvalidArgument("the sum of squares is a float32 scalar");
  Segments seg;
  int64_t n = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (b.has_value()) n += static_cast<int64_t>(b->element_count());
  }
  auto gt = Gradients(args, 0, n, &seg);
  if (gt.has_error()) return gt.error();
  const int64_t w = SumsqWidth(n);
  std::vector<float> acc(static_cast<size_t>(w), 0.f);
  const int isa = g_isa.load(std::memory_order_relaxed);
  int64_t width = w;
  if (n < w) {
    // No whole row (N < W < 2N): XLA:CPU folds `+0 + x*x` and fuses the squares into the first halving add,
    // where LLVM contracts the first of its two products: acc[i] = fma(x[i], x[i], x[i + W/2]^2).
    std::vector<float> x(static_cast<size_t>(w), 0.f);
    for (size_t j = 0; j < seg.data.size(); ++j) {
      const int64_t at = seg.offset[j], count = seg.offset[j + 1] - at;
      for (int64_t i = 0; i < count; ++i)
        x[at + i] = *gt == ffi::DataType::F32 ? static_cast<const float*>(seg.data[j])[i]
                                              : Load(static_cast<const Bf16*>(seg.data[j])[i]);
    }
    ScopedFlushDenormal flush;
    width = w / 2;
    for (int64_t i = 0; i < width; ++i) {
      const float hi = x[i + width] * x[i + width];
      acc[i] = isa == kAvx2Fma ? std::fma(x[i], x[i], hi) : x[i] * x[i] + hi;
    }
  }
  // Lane tiles: as wide as a thread's share (long contiguous reads of each row), at least kSumsqTile lanes.
  int64_t tile = kSumsqTile;
  while (tile * 2 <= w / (pool.num_threads() + 1)) tile *= 2;
  auto lanes = [&](auto g_tag) {
    using G = decltype(g_tag);
    auto run = isa == kAvx2Fma ? &avx2_fma::SumsqRun<G> : &baseline::SumsqRun<G>;
    auto run4 = isa == kAvx2Fma ? &avx2_fma::SumsqRun4<G> : &baseline::SumsqRun4<G>;
    ParallelRanges(pool, w, tile, n < kSerialBelow, [&](int64_t a, int64_t b) {
      for (int64_t base = 0; base + a < n;) {
        const G* rows[4] = {};
        if (base + 3 * w + b <= n) {  // four whole rows of this tile, each inside one gradient buffer?
          for (int r = 0; r < 4; ++r) rows[r] = WithinOne<G>(seg, base + r * w + a, b - a);
        }
        if (rows[0] && rows[1] && rows[2] && rows[3]) {
          run4(acc.data() + a, rows[0], rows[1], rows[2], rows[3], b - a);
          base += 4 * w;
          continue;
        }
        const int64_t end = base + b < n ? base + b : n;
        ForEachPiece(seg, base + a, end, [&](int64_t at, int64_t count, const void* g, int64_t gat, size_t) {
          run(acc.data() + (at - base), static_cast<const G*>(g) + gat, count);
        });
        base += w;
      }
    });
  };
  if (n >= w) {
    if (*gt == ffi::DataType::F32) lanes(float{}); else lanes(Bf16{});
  }
  {
    ScopedFlushDenormal flush;
    for (int64_t half = width / 2; half >= 1; half /= 2) {
      for (int64_t i = 0; i < half; ++i) acc[i] = acc[i] + acc[i + half];
    }
  }
  *static_cast<float*>(out->untyped_data()) = acc[0];
  return ffi::Error::Success();
}

}  // namespace shardopt_kernels

namespace sk = shardopt_kernels;

// Built with -fvisibility=hidden: only the handlers and the C functions below are exported.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardoptAdamUpdate, sk::AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<float>("one_minus_beta_1")
                                  .Attr<float>("one_minus_beta_2")
                                  .Attr<bool>("amsgrad")
                                  .Attr<bool>("has_weight_decay")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("has_scale")
                                  .Attr<bool>("scale_contracted"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardoptAdamPackUpdate, sk::AdamPackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<float>("one_minus_beta_1")
                                  .Attr<float>("one_minus_beta_2")
                                  .Attr<bool>("amsgrad")
                                  .Attr<bool>("has_weight_decay")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("has_scale")
                                  .Attr<bool>("scale_contracted"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardoptSgdUpdate, sk::SgdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("momentum")
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("has_weight_decay")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("has_scale")
                                  .Attr<bool>("scale_float32"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardoptSgdPackUpdate, sk::SgdPackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<float>("momentum")
                                  .Attr<bool>("nesterov")
                                  .Attr<bool>("has_weight_decay")
                                  .Attr<float>("weight_decay")
                                  .Attr<bool>("has_scale")
                                  .Attr<bool>("scale_float32"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ShardoptSumsq, sk::SumsqImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>());

extern "C" {

// Library identity for the Python loader: bump kAbiVersion when operands or attributes change.
__attribute__((visibility("default"))) int ShardoptKernelsAbiVersion() { return sk::kAbiVersion; }

// The instruction set the kernels run with: 0 baseline (no FMA), 1 AVX2+FMA (or AArch64 FMA).
__attribute__((visibility("default"))) int ShardoptKernelsIsa() { return sk::g_isa.load(); }

// Whether this CPU can run `isa`.
__attribute__((visibility("default"))) int ShardoptKernelsIsaSupported(int isa) {
  return isa == sk::kBaseline || (isa == sk::kAvx2Fma && sk::DetectIsa() == sk::kAvx2Fma);
}

// Forces an instruction set (tests and benchmarks); returns 0, or -1 if this CPU cannot run it.
__attribute__((visibility("default"))) int ShardoptKernelsSetIsa(int isa) {
  if (!ShardoptKernelsIsaSupported(isa)) return -1;
  sk::g_isa.store(isa);
  return 0;
}

}  // extern "C"

#pragma GCC visibility pop

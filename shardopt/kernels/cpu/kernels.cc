// One-pass multi-tensor optimizer updates for XLA:CPU, called through XLA's FFI (custom_call api_version 4).
//
// Each handler takes the packed state of a group (p, m, v[, vhat]: one flat buffer of N elements each), the
// runtime scalars as rank-0 float32 buffers, and K gradient buffers whose flattened concatenation is the
// packed gradient (so no gather is materialised). Results alias the state operands (input_output_aliases):
// the state is updated in place, in one read and one write of each array.
//
// Numerics follow the StableHLO formulation that shardopt lowers (see update_loops.inc for the order): float32
// math, bfloat16 state loaded to float32 and rounded once (nearest even) when stored, constants folded as XLA
// folds them (the caller passes float32(1 - beta) as attributes), denormals flushed as XLA:CPU runs (FTZ and
// DAZ), and fused multiply-adds exactly where XLA:CPU's LLVM contracts them on a CPU with FMA.
//
// Threads come from XLA's intra-op pool (ffi::ThreadPool). Work is split in fixed chunks claimed from an
// atomic counter; the calling thread claims chunks too, so the call finishes even if no pool task ever runs,
// and tasks that start late find no chunk left and only touch the shared (ref-counted) counter.

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

constexpr int kAbiVersion = 4;

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

// ---- segments and threads -------------------------------------------------------------------------------

struct Segments {
  std::vector<const void*> data;
  std::vector<int64_t> offset;  // K + 1 prefix offsets
};

// Calls run(state_begin, count, gradient_pointer, index_in_segment, segment) for each piece of [a, b) that lies
// in one gradient buffer.
template <typename F>
static void ForEachPiece(const Segments& seg, int64_t a, int64_t b, F&& run) {
  // First segment whose end is > a.
  size_t lo = 0, hi = seg.data.size();
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (seg.offset[mid + 1] <= a) lo = mid + 1; else hi = mid;
  }
  for (size_t j = lo; j < seg.data.size() && a < b; ++j) {
    const int64_t end = seg.offset[j + 1] < b ? seg.offset[j + 1] : b;
    if (end > a) run(a, end - a, seg.data[j], a - seg.offset[j], j);
    a = end;
  }
}

constexpr int64_t kChunk = int64_t{1} << 16;        // elements per claimed chunk
constexpr int64_t kSerialBelow = int64_t{1} << 17;  // smaller updates run on the calling thread alone

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t nchunks = 0;
  const void* body = nullptr;
  void (*call)(const void*, int64_t) = nullptr;
  std::mutex mu;
  std::condition_variable cv;

  // Claims and runs chunks until none is left.
  void Drain() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      call(body, c);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

template <typename F>
static void ParallelChunks(ffi::ThreadPool& pool, int64_t n, F&& chunk_body /* (begin, end) */) {
  if (n <= 0) return;
  auto whole = [&](int64_t c) {
    const int64_t a = c * kChunk;
    const int64_t b = a + kChunk < n ? a + kChunk : n;
    ScopedFlushDenormal flush;
    chunk_body(a, b);
  };
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  int64_t helpers = pool.num_threads();
  if (n < kSerialBelow || helpers <= 0) {
    for (int64_t c = 0; c < nchunks; ++c) whole(c);
    return;
  }
  if (helpers > nchunks - 1) helpers = nchunks - 1;
  using W = decltype(whole);
  auto shared = std::make_shared<Shared>();
  shared->nchunks = nchunks;
  shared->body = &whole;
  shared->call = [](const void* body, int64_t c) { (*static_cast<const W*>(body))(c); };
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([shared] { shared->Drain(); });
  }
  shared->Drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load(std::memory_order_acquire) == nchunks; });
}

// ---- operand decoding -----------------------------------------------------------------------------------

static bool IsFloat(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

static ffi::ErrorOr<float> Scalar(const ffi::RemainingArgs& args, size_t i, const char* what) {
  auto b = args.get<ffi::AnyBuffer>(i);
  if (!b.has_value()) return ffi::Unexpected(ffi::Error::InvalidArgument(std::string("missing ") + what));
  if (b->element_type() != ffi::DataType::F32 || b->element_count() != 1)
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(what) + " must be a float32 scalar"));
  return *static_cast<const float*>(b->untyped_data());
}

// Gradients args[first:]; all of one float type, element counts summing to n.
static ffi::ErrorOr<ffi::DataType> Gradients(const ffi::RemainingArgs& args, size_t first, int64_t n,
                                             Segments* seg) {
  ffi::DataType type = ffi::DataType::INVALID;
  seg->offset.push_back(0);
  for (size_t i = first; i < args.size(); ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return ffi::Unexpected(ffi::Error::InvalidArgument("gradient operand is not a buffer"));
    if (!IsFloat(b->element_type()) || (type != ffi::DataType::INVALID && b->element_type() != type))
      return ffi::Unexpected(ffi::Error::InvalidArgument("gradients must all be float32 or all bfloat16"));
    type = b->element_type();
    seg->data.push_back(b->untyped_data());
    seg->offset.push_back(seg->offset.back() + static_cast<int64_t>(b->element_count()));
  }
  if (seg->offset.back() != n)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "gradient element counts sum to " + std::to_string(seg->offset.back()) + ", state has " +
        std::to_string(n)));
  if (type == ffi::DataType::INVALID) type = ffi::DataType::F32;
  return type;
}

// In-place update of `out` from `in`: with input_output_aliases the buffers are the same; if XLA ever hands
// distinct ones, the input is copied first.
static void* InPlace(const ffi::AnyBuffer& in, ffi::Result<ffi::AnyBuffer>& out) {
  void* dst = out->untyped_data();
  if (dst != in.untyped_data()) std::memcpy(dst, in.untyped_data(), in.size_bytes());
  return dst;
}

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

// Runs run(P, at, count, g, gat) over [0, n) on the pool, piece by piece: `at` indexes the packed state, `g` +
// `gat` the piece's gradient, and P the variable: one buffer (p.size() == 1, indexed by the state position) or
// one buffer per gradient segment (a pack whose variables stay in buffers of their own, indexed within it).
template <typename S, typename F>
static void RunPieces(ffi::ThreadPool& pool, int64_t n, const Segments& seg, const std::vector<void*>& p, F&& run) {
  const bool segmented = p.size() > 1;
  ParallelChunks(pool, n, [&](int64_t a, int64_t b) {
    ForEachPiece(seg, a, b, [&](int64_t at, int64_t count, const void* g, int64_t gat, size_t j) {
      S* P = segmented ? static_cast<S*>(p[j]) + gat : static_cast<S*>(p[0]) + at;
      run(P, at, count, g, gat);
    });
  });
}

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

// Reads rank-0 float32 operands rest[i], rest[i + 1], ... into the non-null entries of `dst` in order (a null
// entry is an operand this call does not have); returns the index after them.
template <size_t N>
static ffi::ErrorOr<size_t> ReadScalars(const ffi::RemainingArgs& rest, size_t i, float* const (&dst)[N],
                                        const char* const (&names)[N]) {
  for (size_t j = 0; j < N; ++j) {
    if (dst[j] == nullptr) continue;
    auto x = Scalar(rest, i++, names[j]);
    if (x.has_error()) return ffi::Unexpected(x.error());
    *dst[j] = *x;
  }
  return i;
}

// What both Adam handlers read after their fixed operands: [vhat] alpha eps [lr] [scale], in that order.
struct AdamHead {
  const void* vh_in = nullptr;
  size_t vh_bytes = 0;
  AdamScalars k{};
  size_t next = 0;  // index in `rest` of the first operand after them
};

static ffi::ErrorOr<AdamHead> DecodeAdamHead(const ffi::RemainingArgs& rest, ffi::DataType st, int64_t n, float c1,
                                             float c2, bool amsgrad, bool has_weight_decay, float weight_decay,
                                             bool has_scale) {
  AdamHead h;
  h.k = AdamScalars{c1, c2, 0.f, 0.f, weight_decay, 0.f, 1.f};
  size_t i = 0;
  if (amsgrad) {
    auto vh = rest.get<ffi::AnyBuffer>(i++);
    if (!vh.has_value() || vh->element_type() != st || static_cast<int64_t>(vh->element_count()) != n)
      return ffi::Unexpected(ffi::Error::InvalidArgument("vhat must match the state"));
    h.vh_in = vh->untyped_data();
    h.vh_bytes = vh->size_bytes();
  }
  auto next = ReadScalars(rest, i, {&h.k.alpha, &h.k.eps, has_weight_decay ? &h.k.lr : nullptr,
                                    has_scale ? &h.k.scale : nullptr}, {"alpha", "eps", "lr", "scale"});
  if (next.has_error()) return ffi::Unexpected(next.error());
  h.next = *next;
  return h;
}

// What both SGD handlers read after their fixed operands: lr [scale]; returns the index after them.
static ffi::ErrorOr<size_t> DecodeSgdHead(const ffi::RemainingArgs& rest, float momentum, float weight_decay,
                                          bool has_scale, SgdScalars* k) {
  *k = SgdScalars{momentum, 0.f, weight_decay, 1.f};
  return ReadScalars(rest, 0, {&k->lr, has_scale ? &k->scale : nullptr}, {"lr", "scale"});
}

// The variables and gradients of a pack handler: rest[first:] holds p_0 .. p_{K-1} then grad_0 .. grad_{K-1}, the
// results rest_out[first_ret:] the new p_j. Each p_j has grad_j's element count and the slots' dtype `st`; the
// gradients' concatenation is the packed state of `n` elements.
struct PackOperands {
  std::vector<void*> p;  // the variables' result buffers (holding their inputs)
  Segments seg;
  ffi::DataType gt = ffi::DataType::F32;
};

static ffi::ErrorOr<PackOperands> DecodePack(const ffi::RemainingArgs& rest, ffi::RemainingRets& rest_out,
                                             size_t first, size_t first_ret, ffi::DataType st, int64_t n) {
  if (first > rest.size() || (rest.size() - first) % 2 != 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument("a pack update needs one variable buffer per gradient"));
  const size_t count = (rest.size() - first) / 2;
  if (rest_out.size() != first_ret + count)
    return ffi::Unexpected(ffi::Error::InvalidArgument("a pack update returns one buffer per variable"));
  PackOperands out;
  // Gradients follow the variables; Gradients() reads args[first:] to the end.
  auto gt = Gradients(rest, first + count, n, &out.seg);
  if (gt.has_error()) return ffi::Unexpected(gt.error());
  out.gt = *gt;
  out.p.resize(count);
  for (size_t j = 0; j < count; ++j) {
    auto in = rest.get<ffi::AnyBuffer>(first + j);
    auto res = rest_out.get<ffi::AnyBuffer>(first_ret + j);
    if (!in.has_value() || !res.has_value())
      return ffi::Unexpected(ffi::Error::InvalidArgument("variable operand is not a buffer"));
    if (in->element_type() != st ||
        static_cast<int64_t>(in->element_count()) != out.seg.offset[j + 1] - out.seg.offset[j])
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "variable " + std::to_string(j) + " must have its gradient's element count and the slots' dtype"));
    out.p[j] = InPlace(*in, *res);
  }
  return out;
}

// The state buffers' shared element count, or an error if they differ in it or in their (float) dtype.
static ffi::ErrorOr<int64_t> StateCount(std::initializer_list<const ffi::AnyBuffer*> state, const char* names) {
  const ffi::DataType st = (*state.begin())->element_type();
  const int64_t n = static_cast<int64_t>((*state.begin())->element_count());
  for (const ffi::AnyBuffer* b : state) {
    if (!IsFloat(st) || b->element_type() != st)
      return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(names) +
                                                         " must share one dtype, float32 or bfloat16"));
    if (static_cast<int64_t>(b->element_count()) != n)
      return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(names) + " must have the same element count"));
  }
  return n;
}

// The AMSGrad result rest_out[0], holding vhat's input.
static ffi::ErrorOr<void*> VhatResult(ffi::RemainingRets& rest_out, const AdamHead& head) {
  auto vh_out = rest_out.get<ffi::AnyBuffer>(0);
  if (!vh_out.has_value()) return ffi::Unexpected(ffi::Error::InvalidArgument("missing vhat result"));
  void* vhp = (*vh_out)->untyped_data();
  if (vhp != head.vh_in) std::memcpy(vhp, head.vh_in, head.vh_bytes);
  return vhp;
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

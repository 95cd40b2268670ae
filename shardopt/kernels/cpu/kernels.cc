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

// The element at position `a` of the concatenation when [a, a + count) lies inside one gradient buffer, else null.
template <typename G>
static const G* WithinOne(const Segments& seg, int64_t a, int64_t count) {
  const G* found = nullptr;
  ForEachPiece(seg, a, a + count, [&](int64_t, int64_t c, const void* g, int64_t gat, size_t) {
    if (c == count) found = static_cast<const G*>(g) + gat;
  });
  return found;
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

// Runs chunk_body(begin, end) over [0, n) in pieces of `chunk`, on the pool's threads unless `serial`.
template <typename F>
static void ParallelRanges(ffi::ThreadPool& pool, int64_t n, int64_t chunk, bool serial,
                           F&& chunk_body /* (begin, end) */) {
  if (n <= 0) return;
  auto whole = [&](int64_t c) {
    const int64_t a = c * chunk;
    const int64_t b = a + chunk < n ? a + chunk : n;
    ScopedFlushDenormal flush;
    chunk_body(a, b);
  };
  const int64_t nchunks = (n + chunk - 1) / chunk;
  int64_t helpers = pool.num_threads();
  if (serial || helpers <= 0) {
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

template <typename F>
static void ParallelChunks(ffi::ThreadPool& pool, int64_t n, F&& chunk_body /* (begin, end) */) {
  ParallelRanges(pool, n, kChunk, n < kSerialBelow, chunk_body);
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

template <typename F>
static void WithFlags3(bool a, bool b, bool c, F&& f) {
  auto c3 = [&](auto x, auto y) { c ? f(x, y, Bool<true>{}) : f(x, y, Bool<false>{}); };
  auto c2 = [&](auto x) { b ? c3(x, Bool<true>{}) : c3(x, Bool<false>{}); };
  a ? c2(Bool<true>{}) : c2(Bool<false>{});
}

// Runs the Adam loops over the whole group: `p` is one buffer (p.size() == 1, indexed by the state position) or
// one buffer per gradient segment (a pack whose variables stay in buffers of their own, indexed within the
// segment); m, v and vhat are packed.
static void AdamRunAll(ffi::ThreadPool& pool, ffi::DataType st, ffi::DataType gt, bool amsgrad,
                       bool has_weight_decay, bool has_scale, bool scale_contracted, const AdamScalars& k,
                       int64_t n, const Segments& seg, const std::vector<void*>& p, void* mp, void* vp,
                       void* vhp) {
  const bool segmented = p.size() > 1;
  const int isa = g_isa.load(std::memory_order_relaxed);
  WithTypes(st, gt, [&](auto s_tag, auto g_tag) {
    using S = decltype(s_tag);
    using G = decltype(g_tag);
    const int scale_mode = has_scale ? (scale_contracted ? 2 : 1) : 0;
    WithFlags3(amsgrad, has_weight_decay, scale_mode == 2, [&](auto ams, auto wd, auto contracted) {
     auto dispatch = [&](auto sc) {
      constexpr int kSc = decltype(sc)::value ? (decltype(contracted)::value ? 2 : 1) : 0;
      auto run = isa == kAvx2Fma ? &avx2_fma::AdamRun<S, G, decltype(ams)::value, decltype(wd)::value, kSc>
                                 : &baseline::AdamRun<S, G, decltype(ams)::value, decltype(wd)::value, kSc>;
      S* M = static_cast<S*>(mp);
      S* V = static_cast<S*>(vp);
      S* VH = static_cast<S*>(vhp);
      ParallelChunks(pool, n, [&](int64_t a, int64_t b) {
        ForEachPiece(seg, a, b, [&](int64_t at, int64_t count, const void* g, int64_t gat, size_t j) {
          S* P = segmented ? static_cast<S*>(p[j]) + gat : static_cast<S*>(p[0]) + at;
          run(P, M + at, V + at, VH ? VH + at : nullptr, static_cast<const G*>(g) + gat, count, k);
        });
      });
     };
     scale_mode ? dispatch(Bool<true>{}) : dispatch(Bool<false>{});
    });
  });
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
  float* scalars[] = {&h.k.alpha, &h.k.eps, has_weight_decay ? &h.k.lr : nullptr, has_scale ? &h.k.scale : nullptr};
  const char* names[] = {"alpha", "eps", "lr", "scale"};
  for (int j = 0; j < 4; ++j) {
    if (scalars[j] == nullptr) continue;
    auto x = Scalar(rest, i++, names[j]);
    if (x.has_error()) return ffi::Unexpected(x.error());
    *scalars[j] = *x;
  }
  h.next = i;
  return h;
}

// ---- Adam -----------------------------------------------------------------------------------------------

// Operands: p, m, v, then [vhat] alpha eps [lr] [scale] grad_0 ... grad_{K-1}; results p, m, v[, vhat].
static ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::AnyBuffer p, ffi::AnyBuffer m, ffi::AnyBuffer v,
                           ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> p_out,
                           ffi::Result<ffi::AnyBuffer> m_out, ffi::Result<ffi::AnyBuffer> v_out,
                           ffi::RemainingRets rest_out, float c1, float c2, bool amsgrad, bool has_weight_decay,
                           float weight_decay, bool has_scale, bool scale_contracted) {
  const ffi::DataType st = p.element_type();
  if (!IsFloat(st) || m.element_type() != st || v.element_type() != st)
    return ffi::Error::InvalidArgument("p, m, v must share one dtype, float32 or bfloat16");
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (static_cast<int64_t>(m.element_count()) != n || static_cast<int64_t>(v.element_count()) != n)
    return ffi::Error::InvalidArgument("p, m, v must have the same element count");
  auto head = DecodeAdamHead(rest, st, n, c1, c2, amsgrad, has_weight_decay, weight_decay, has_scale);
  if (head.has_error()) return head.error();
  size_t i = head->next;
  const void* vh_in = head->vh_in;
  const size_t vh_bytes = head->vh_bytes;
  const AdamScalars k = head->k;
  Segments seg;
  auto gt = Gradients(rest, i, n, &seg);
  if (gt.has_error()) return gt.error();

  void* pp = InPlace(p, p_out);
  void* mp = InPlace(m, m_out);
  void* vp = InPlace(v, v_out);
  void* vhp = nullptr;
  if (amsgrad) {
    auto vh_out = rest_out.get<ffi::AnyBuffer>(0);
    if (!vh_out.has_value()) return ffi::Error::InvalidArgument("missing vhat result");
    vhp = (*vh_out)->untyped_data();
    if (vhp != vh_in) std::memcpy(vhp, vh_in, vh_bytes);
  }
  AdamRunAll(pool, st, *gt, amsgrad, has_weight_decay, has_scale, scale_contracted, k, n, seg, {pp}, mp, vp, vhp);
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
  if (!IsFloat(st) || v.element_type() != st)
    return ffi::Error::InvalidArgument("m, v must share one dtype, float32 or bfloat16");
  const int64_t n = static_cast<int64_t>(m.element_count());
  if (static_cast<int64_t>(v.element_count()) != n)
    return ffi::Error::InvalidArgument("m, v must have the same element count");
  auto head = DecodeAdamHead(rest, st, n, c1, c2, amsgrad, has_weight_decay, weight_decay, has_scale);
  if (head.has_error()) return head.error();
  size_t i = head->next;
  const void* vh_in = head->vh_in;
  const size_t vh_bytes = head->vh_bytes;
  const AdamScalars k = head->k;
  if (i > rest.size() || (rest.size() - i) % 2 != 0)
    return ffi::Error::InvalidArgument("a pack update needs one variable buffer per gradient");
  const size_t count = (rest.size() - i) / 2;
  const size_t first_ret = amsgrad ? 1 : 0;
  if (rest_out.size() != first_ret + count)
    return ffi::Error::InvalidArgument("a pack update returns one buffer per variable");
  Segments seg;
  // Gradients follow the variables; Gradients() reads args[first:] to the end.
  auto gt = Gradients(rest, i + count, n, &seg);
  if (gt.has_error()) return gt.error();
  std::vector<void*> p(count);
  for (size_t j = 0; j < count; ++j) {
    auto in = rest.get<ffi::AnyBuffer>(i + j);
    auto out = rest_out.get<ffi::AnyBuffer>(first_ret + j);
    if (!in.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("variable operand is not a buffer");
    if (in->element_type() != st || static_cast<int64_t>(in->element_count()) != seg.offset[j + 1] - seg.offset[j])
      return ffi::Error::InvalidArgument("variable " + std::to_string(j) +
                                         " must have its gradient's element count and the slots' dtype");
    p[j] = InPlace(*in, *out);
  }
  void* mp = InPlace(m, m_out);
  void* vp = InPlace(v, v_out);
  void* vhp = nullptr;
  if (amsgrad) {
    auto vh_out = rest_out.get<ffi::AnyBuffer>(0);
    if (!vh_out.has_value()) return ffi::Error::InvalidArgument("missing vhat result");
    vhp = (*vh_out)->untyped_data();
    if (vhp != vh_in) std::memcpy(vhp, vh_in, vh_bytes);
  }
  if (count == 0) return ffi::Error::Success();
  AdamRunAll(pool, st, *gt, amsgrad, has_weight_decay, has_scale, scale_contracted, k, n, seg, p, mp, vp, vhp);
  return ffi::Error::Success();
}

// ---- SGD with momentum ----------------------------------------------------------------------------------

// Operands: p, m, then lr [scale] grad_0 ... grad_{K-1}; results p, m.
static ffi::Error SgdImpl(ffi::ThreadPool pool, ffi::AnyBuffer p, ffi::AnyBuffer m, ffi::RemainingArgs rest,
                          ffi::Result<ffi::AnyBuffer> p_out, ffi::Result<ffi::AnyBuffer> m_out, float momentum,
                          bool nesterov, bool has_weight_decay, float weight_decay, bool has_scale) {
  const ffi::DataType st = p.element_type();
  if (!IsFloat(st) || m.element_type() != st)
    return ffi::Error::InvalidArgument("p, m must share one dtype, float32 or bfloat16");
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (static_cast<int64_t>(m.element_count()) != n)
    return ffi::Error::InvalidArgument("p, m must have the same element count");
  SgdScalars k{momentum, 0.f, weight_decay, 1.f};
  size_t i = 0;
  auto lr = Scalar(rest, i++, "lr");
  if (lr.has_error()) return lr.error();
  k.lr = *lr;
  if (has_scale) {
    auto s = Scalar(rest, i++, "scale");
    if (s.has_error()) return s.error();
    k.scale = *s;
  }
  Segments seg;
  auto gt = Gradients(rest, i, n, &seg);
  if (gt.has_error()) return gt.error();
  void* pp = InPlace(p, p_out);
  void* mp = InPlace(m, m_out);
  const int isa = g_isa.load(std::memory_order_relaxed);
  WithTypes(st, *gt, [&](auto s_tag, auto g_tag) {
    using S = decltype(s_tag);
    using G = decltype(g_tag);
    WithFlags3(nesterov, has_weight_decay, has_scale, [&](auto nes, auto wd, auto sc) {
      auto run = isa == kAvx2Fma ? &avx2_fma::SgdRun<S, G, decltype(nes)::value, decltype(wd)::value,
                                                     decltype(sc)::value>
                                 : &baseline::SgdRun<S, G, decltype(nes)::value, decltype(wd)::value,
                                                     decltype(sc)::value>;
      S* P = static_cast<S*>(pp);
      S* M = static_cast<S*>(mp);
      ParallelChunks(pool, n, [&](int64_t a, int64_t b) {
        ForEachPiece(seg, a, b, [&](int64_t at, int64_t count, const void* g, int64_t gat, size_t) {
          run(P + at, M + at, static_cast<const G*>(g) + gat, count, k);
        });
      });
    });
  });
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
                                  .Attr<bool>("has_scale"));

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

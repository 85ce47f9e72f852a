// Torch binding of the fused off-ramp (elmer_fairseq/ops/off_ramp.py is the specification).
//
// Both paths walk the vocabulary in chunks of C columns: logits = rows @ weight[v0:v0+C].T by ATen
// in the input dtype (as the reference does), then fold the chunk into a per-row online state
// (max, lowest argmax, sum exp, sum exp * logit), so at most [N, C] logits exist at a time (on the
// CPU, per thread, with C sized so that the chunk stays in L2: see "CPU path").
// Built without WITH_CUDA this is the CPU-only extension; with it, off_ramp_kernel.cu serves
// CUDA tensors.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "off_ramp_kernel.h"
#endif

// The CPU path's AVX2 sweeps: compiled with GCC / Clang on x86 (unless ELMER_OFF_RAMP_NO_AVX2,
// which builds what other CPUs get), run where the CPU has AVX2 + FMA.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(ELMER_OFF_RAMP_NO_AVX2)
#define ELMER_OFF_RAMP_AVX2 1
#include <immintrin.h>
#endif

// MKL's thread count for the calling thread only (see SerialBlas), where torch links MKL.
#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define ELMER_MKL_LOCAL_THREADS 1
#endif

namespace {

using at::Tensor;
using Output = std::tuple<Tensor, Tensor, Tensor, Tensor, c10::optional<Tensor>>;

// What a position's exit is decided by (exit_policy.SIGNALS): entropy < threshold (the paper's
// rule), or 1 - prob < threshold (max-prob). Same values as OffRampSignal in off_ramp_kernel.h.
enum class ExitSignal : int { kEntropy = 0, kMaxProb = 1 };

ExitSignal parse_signal(const std::string& name) {
  if (name == "entropy") return ExitSignal::kEntropy;
  if (name == "max_prob") return ExitSignal::kMaxProb;
  TORCH_CHECK(false, "off_ramp: signal must be 'entropy' or 'max_prob', got '", name, "'");
}

// In float32, as the reference's `entropy < threshold` / `1 - prob < threshold`.
inline bool exit_rule(ExitSignal signal, float entropy, float prob, float threshold) {
  return signal == ExitSignal::kMaxProb ? (1.f - prob) < threshold : entropy < threshold;
}

bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_args(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& index,
                const c10::optional<Tensor>& state) {
  TORCH_CHECK(hidden.dim() == 2, "off_ramp: hidden must be [M, d], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "off_ramp: weight must be [V, d], got shape ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "off_ramp: hidden [M, d] and weight [V, d] need "
              "the same d, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "off_ramp: weight has no rows (V = 0)");
  TORCH_CHECK(weight.size(0) < std::numeric_limits<int32_t>::max(), "off_ramp: V too large");
  TORCH_CHECK(supported(hidden.scalar_type()), "off_ramp: hidden must be float32, bfloat16 or "
              "float16, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "off_ramp: weight dtype ",
              weight.scalar_type(), " differs from hidden dtype ", hidden.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), "off_ramp: weight is on ", weight.device(),
              ", hidden on ", hidden.device());
  if (index) {
    TORCH_CHECK(index->dim() == 1, "off_ramp: index must be [N], got shape ", index->sizes());
    TORCH_CHECK(index->scalar_type() == at::kLong, "off_ramp: index must be int64, got ",
                index->scalar_type());
    TORCH_CHECK(index->device() == hidden.device(), "off_ramp: index is on ", index->device(),
                ", hidden on ", hidden.device());
  }
  if (state) {
    TORCH_CHECK(state->sizes() == hidden.sizes(), "off_ramp: state must have hidden's shape ",
                hidden.sizes(), ", got ", state->sizes());
    TORCH_CHECK(state->scalar_type() == hidden.scalar_type(), "off_ramp: state dtype ",
                state->scalar_type(), " differs from hidden dtype ", hidden.scalar_type());
    TORCH_CHECK(state->device() == hidden.device(), "off_ramp: state is on ", state->device(),
                ", hidden on ", hidden.device());
  }
}

// Columns per chunk, unless `chunk` > 0. GPU: 16384, halved while the logits buffer exceeds
// 512 MiB (on an H100, 16384 beat 2048..8192 by 5-30%: fewer launches; keeping the buffer in L2
// did not pay). CPU: a block of logits of at most 256 KiB, so that it stays in the core's L2
// between the GEMM that writes it and the sweeps that read it, but at least 256 columns, below
// which the GEMM's per-call packing of the rows starts to cost (measured, one thread, d = 384,
// V = 21600, 2-core AMD EPYC with 512 KiB L2 per core: best C 1024-2048 at N = 32, 512-1024 at
// N = 128, 256-512 at N = 512; docs/kernel.md); then evened out so that the blocks are of one
// size and their number a multiple of the threads, which take a run of blocks each. Peak memory
// stays O(N*d + N*C) (per thread, on the CPU) either way.
int64_t chunk_columns(int64_t chunk, int64_t n, int64_t v, int64_t elem, bool cuda) {
  if (chunk > 0) return std::min(chunk, v);
  n = std::max<int64_t>(n, 1);
  if (!cuda) {
    const int64_t fit = (int64_t{256} << 10) / (n * elem) / 64 * 64;  // 256 KiB of logits
    const int64_t c = std::min(v, std::max<int64_t>(256, fit));
    const int64_t threads = std::max(1, at::get_num_threads());
    const int64_t blocks = ((v + c - 1) / c + threads - 1) / threads * threads;
    const int64_t even = ((v + blocks - 1) / blocks + 63) / 64 * 64;  // <= c
    return std::min(v, std::max(even, std::min<int64_t>(v, 256)));
  }
  int64_t c = 16384;
  while (c > 1024 && n * c * elem > (int64_t{512} << 20)) c /= 2;
  return std::min(c, v);
}

// Logits of one chunk, rows @ weight[v0 : v0 + c].T, written into `buf`. On the GPU the rows are
// padded to a multiple of 8 columns so that cuBLAS and the 16-byte loads stay aligned on the
// ragged last chunk (V = 50265 is odd).
Tensor chunk_matmul(Tensor& buf, const Tensor& rows, const Tensor& weight, int64_t v0, int64_t c) {
  const int64_t n = rows.size(0);
  const int64_t ld = rows.is_cuda() ? (c + 7) / 8 * 8 : c;
  auto logits = buf.narrow(0, 0, n * ld).view({n, ld}).narrow(1, 0, c);
  at::mm_out(logits, rows, weight.narrow(0, v0, c).t());
  return logits;
}

int64_t buffer_size(int64_t n, int64_t c) { return n * ((c + 7) / 8 * 8); }

// ---------------------------------------------------------------------------------------------
// CPU path
//
// Block by block over the vocabulary: one BLAS GEMM writes the [n, C] logits of columns
// v0 .. v0 + C - 1 into a reused buffer small enough to stay in L2, and each row of it is folded
// into the row's running state while it is still there, in two sweeps over the C values: the block
// max and its lowest column, then sum exp(l - m) and sum exp(l - m) * (l - m) relative to the
// running max m. Within a block the sums are float vectors (at most C / 16 terms per lane, all of
// one sign); across blocks they are double. On x86-64 with AVX2 + FMA (checked at run time) the
// sweeps are 8-wide AVX2 with a polynomial exp (Cephes' expf, ~1 ulp); elsewhere a scalar loop
// computes the same quantities with std::exp.

struct RowAcc {
  float m;      // max logit so far
  int64_t idx;  // lowest column attaining m
  double s;     // sum exp(l - m); 0 means empty (a non-empty one is >= 1, or NaN)
  double t;     // sum exp(l - m) * (l - m) <= 0: relative to m, so it never cancels
};

// Below this, exp(l - m) is taken as 0 (expf's smallest normal result is exp(-87.34)). A logit of
// -inf then gives 0 * -inf = NaN in t, as the reference's p * log p does.
constexpr float kExpLow = -87.33654475f;

struct BlockMax {
  float value;
  int64_t index;  // lowest column of the block attaining `value`; 0 if no value beats -inf
};

BlockMax block_max_scalar(const float* x, int64_t c) {
  BlockMax b{-std::numeric_limits<float>::infinity(), 0};
  for (int64_t j = 0; j < c; ++j) {
    if (x[j] > b.value) {  // strict: the lowest column wins ties; NaN never wins
      b.value = x[j];
      b.index = j;
    }
  }
  return b;
}

void block_sums_scalar(const float* x, int64_t c, float m, float* s, float* t) {
  float ss = 0.f, tt = 0.f;
  for (int64_t j = 0; j < c; ++j) {
    const float d = x[j] - m;
    const float e = d < kExpLow ? 0.f : std::exp(d);
    ss += e;
    tt += e * d;
  }
  *s = ss;
  *t = tt;
}

#ifdef ELMER_OFF_RAMP_AVX2

#define ELMER_AVX2 __attribute__((target("avx2,fma")))

// exp of 8 floats <= 88.37 (Cephes' expf: ~1 ulp on the range used here, d in [-87.34, 0]);
// NaN stays NaN; below kExpLow the caller masks the result to 0.
ELMER_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // (min / max return x if x is NaN)
  x = _mm256_max_ps(_mm256_set1_ps(kExpLow), x);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// one (max, column) accumulator: replaced only by a strictly greater value
ELMER_AVX2 inline void max_update(__m256& mx, __m256i& ix, __m256 v, __m256i cols) {
  const __m256 gt = _mm256_cmp_ps(v, mx, _CMP_GT_OQ);
  mx = _mm256_blendv_ps(mx, v, gt);
  ix = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(ix), _mm256_castsi256_ps(cols), gt));
}

// lane-wise: (ma, ia) becomes the larger of the two, the lower column on equal values
ELMER_AVX2 inline void max_merge(__m256& ma, __m256i& ia, __m256 mb, __m256i ib) {
  const __m256 gt = _mm256_cmp_ps(mb, ma, _CMP_GT_OQ);
  const __m256 lower = _mm256_castsi256_ps(_mm256_cmpgt_epi32(ia, ib));
  const __m256 take = _mm256_or_ps(gt, _mm256_and_ps(_mm256_cmp_ps(mb, ma, _CMP_EQ_OQ), lower));
  ma = _mm256_blendv_ps(ma, mb, take);
  ia = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(ia), _mm256_castsi256_ps(ib), take));
}

ELMER_AVX2 BlockMax block_max_avx2(const float* x, int64_t c) {
  // four independent (max, column) accumulators; each lane sees its columns in increasing order
  // and replaces only on a strictly greater value, so it holds its lowest column of its max
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 mx0 = ninf, mx1 = ninf, mx2 = ninf, mx3 = ninf;
  __m256i ix0 = _mm256_setzero_si256(), ix1 = ix0, ix2 = ix0, ix3 = ix0;
  __m256i col = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step8 = _mm256_set1_epi32(8), step32 = _mm256_set1_epi32(32);
  int64_t j = 0;
  for (; j + 32 <= c; j += 32) {
    const __m256i c1 = _mm256_add_epi32(col, step8), c2 = _mm256_add_epi32(c1, step8);
    max_update(mx0, ix0, _mm256_loadu_ps(x + j), col);
    max_update(mx1, ix1, _mm256_loadu_ps(x + j + 8), c1);
    max_update(mx2, ix2, _mm256_loadu_ps(x + j + 16), c2);
    max_update(mx3, ix3, _mm256_loadu_ps(x + j + 24), _mm256_add_epi32(c2, step8));
    col = _mm256_add_epi32(col, step32);
  }
  for (; j + 8 <= c; j += 8) {
    max_update(mx0, ix0, _mm256_loadu_ps(x + j), col);
    col = _mm256_add_epi32(col, step8);
  }
  max_merge(mx0, ix0, mx1, ix1);
  max_merge(mx2, ix2, mx3, ix3);
  max_merge(mx0, ix0, mx2, ix2);
  alignas(32) float mv[8];
  alignas(32) int32_t iv[8];
  _mm256_store_ps(mv, mx0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(iv), ix0);
  BlockMax b{mv[0], iv[0]};
  for (int k = 1; k < 8; ++k) {
    if (mv[k] > b.value || (mv[k] == b.value && iv[k] < b.index)) {
      b.value = mv[k];
      b.index = iv[k];
    }
  }
  if (b.value == -std::numeric_limits<float>::infinity()) b.index = 0;  // as the scalar sweep
  for (; j < c; ++j) {  // the last c % 8 columns, after every vector column
    if (x[j] > b.value) {
      b.value = x[j];
      b.index = j;
    }
  }
  return b;
}

ELMER_AVX2 inline void sums8(__m256 v, __m256 vm, __m256 low, __m256& s, __m256& t) {
  const __m256 d = _mm256_sub_ps(v, vm);
  // d < kExpLow (ordered: false for NaN, which must propagate) contributes 0
  const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(d, low, _CMP_LT_OQ), exp256(d));
  s = _mm256_add_ps(s, e);
  t = _mm256_fmadd_ps(e, d, t);
}

ELMER_AVX2 float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

ELMER_AVX2 void block_sums_avx2(const float* x, int64_t c, float m, float* s, float* t) {
  const __m256 vm = _mm256_set1_ps(m), low = _mm256_set1_ps(kExpLow);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
  int64_t j = 0;
  for (; j + 16 <= c; j += 16) {
    sums8(_mm256_loadu_ps(x + j), vm, low, s0, t0);
    sums8(_mm256_loadu_ps(x + j + 8), vm, low, s1, t1);
  }
  if (j + 8 <= c) {
    sums8(_mm256_loadu_ps(x + j), vm, low, s0, t0);
    j += 8;
  }
  if (j < c) {  // the last c % 8 columns, padded with m and masked out
    alignas(32) float tail[8];
    for (int k = 0; k < 8; ++k) tail[k] = j + k < c ? x[j + k] : m;
    const __m256 v = _mm256_load_ps(tail);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int32_t>(c - j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    __m256 ps = _mm256_setzero_ps(), pt = ps;
    sums8(v, vm, low, ps, pt);
    s1 = _mm256_add_ps(s1, _mm256_and_ps(ps, keep));
    t1 = _mm256_add_ps(t1, _mm256_and_ps(pt, keep));
  }
  *s = hsum(_mm256_add_ps(s0, s1));
  *t = hsum(_mm256_add_ps(t0, t1));
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
bool cpu_has_avx2() { return false; }
BlockMax block_max_avx2(const float* x, int64_t c) { return block_max_scalar(x, c); }  // (unused)
void block_sums_avx2(const float* x, int64_t c, float m, float* s, float* t) {
  block_sums_scalar(x, c, m, s, t);
}
#endif

// 1: the AVX2 sweeps where the CPU has them (default); 0: the scalar sweeps (tests)
std::atomic<int> cpu_simd{1};

bool use_avx2() { return cpu_simd.load(std::memory_order_relaxed) != 0 && cpu_has_avx2(); }

// Folds columns v0 .. v0 + c - 1 of one row (float32 values x) into its state.
void fold_block(const float* x, int64_t c, int64_t v0, bool avx2, RowAcc& a) {
  const BlockMax b = avx2 ? block_max_avx2(x, c) : block_max_scalar(x, c);
  if (a.s == 0.0 || b.value > a.m) {
    if (a.s != 0.0) {  // rescale what was summed relative to the old max
      const double d = static_cast<double>(a.m) - b.value;
      const double e = std::exp(d);
      a.t = (a.t + d * a.s) * e;
      a.s *= e;
    }
    a.m = b.value;
    a.idx = v0 + b.index;
  }
  float ss, tt;
  if (avx2) {
    block_sums_avx2(x, c, a.m, &ss, &tt);
  } else {
    block_sums_scalar(x, c, a.m, &ss, &tt);
  }
  a.s += ss;
  a.t += tt;
}

// Merges b, the state of columns after a's, into a.
void merge_acc(RowAcc& a, const RowAcc& b) {
  if (b.s == 0.0) return;
  if (a.s == 0.0) {
    a = b;
    return;
  }
  const float m = std::max(a.m, b.m);
  const double da = static_cast<double>(a.m) - m, db = static_cast<double>(b.m) - m;  // <= 0
  const double ea = std::exp(da), eb = std::exp(db);
  a.t = (a.t + da * a.s) * ea + (b.t + db * b.s) * eb;
  a.s = a.s * ea + b.s * eb;
  a.idx = b.m > a.m ? b.idx : (a.m > b.m ? a.idx : std::min(a.idx, b.idx));
  a.m = m;
}

// The vocabulary's blocks of the CPU path, split into `tasks` runs of consecutive blocks, one per
// thread: a task owns a block buffer and calls fn(task, v0, logits [n, c]) for its blocks in
// increasing v0. The GEMMs run inside the parallel region, each single-threaded (SerialBlas): one
// fork and join per call instead of two per block, and each thread reads its own part of W.
// MKL (x86 torch wheels link it into libtorch_cpu) runs its GEMMs in parallel even when called
// from inside a parallel region, since libgomp allows nested teams by default: each of our T tasks
// then started T more threads, and with OpenMP's spin-waiting 2 threads took 190 ms instead of 13
// for one call at N = 32 (2-core machine). So each task asks MKL for one thread, for itself only,
// through MKL's C function (the lowercase mkl_set_num_threads_local symbol is its Fortran
// interface, which takes a pointer); a weak reference: a no-op where torch has no MKL (OpenBLAS
// runs single-threaded in a parallel region by itself).
class SerialBlas {
 public:
#ifdef ELMER_MKL_LOCAL_THREADS
  SerialBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);  // 0: MKL's global setting
  }

 private:
  int prev_;
#endif
};

// > 0: that many tasks whatever the threads (tests: the merge of runs, on one thread)
std::atomic<int64_t> cpu_split{0};

int64_t cpu_tasks(int64_t v, int64_t c_max) {
  const int64_t split = cpu_split.load(std::memory_order_relaxed);
  const int64_t want = split > 0 ? split : std::max(1, at::get_num_threads());
  return std::min<int64_t>(want, (v + c_max - 1) / c_max);
}

template <typename F>
void for_each_block_cpu(const Tensor& rows, const Tensor& weight, int64_t c_max, int64_t tasks,
                        const F& fn) {
  const int64_t n = rows.size(0), v = weight.size(0), blocks = (v + c_max - 1) / c_max;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    c10::optional<SerialBlas> serial;
    if (tasks > 1) serial.emplace();  // (one task runs inline, outside any parallel region)
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b0 = blocks * task / tasks, b1 = blocks * (task + 1) / tasks;
      if (b0 == b1) continue;
      auto buf = at::empty({buffer_size(n, c_max)}, rows.options());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t v0 = b * c_max;
        fn(task, v0, chunk_matmul(buf, rows, weight, v0, std::min(c_max, v - v0)));
      }
    }
  });
}

template <typename T>
void reduce_block_cpu(const T* x, int64_t n, int64_t c, int64_t v0, bool avx2, RowAcc* acc) {
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / c), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t r = begin; r < end; ++r) fold_block(x + r * c, c, v0, avx2, acc[r]);
    } else {  // bf16 / fp16 logits: widened one row at a time into a scratch row
      std::vector<float> row(c);
      for (int64_t r = begin; r < end; ++r) {
        const T* src = x + r * c;
        for (int64_t j = 0; j < c; ++j) row[j] = static_cast<float>(src[j]);
        fold_block(row.data(), c, v0, avx2, acc[r]);
      }
    }
  });
}

void off_ramp_cpu(const Tensor& rows, const Tensor& weight, float threshold, ExitSignal signal,
                  int64_t chunk, Tensor& token, Tensor& prob, Tensor& entropy, Tensor& exit_mask) {
  const int64_t n = rows.size(0), v = weight.size(0);
  const int64_t c_max = chunk_columns(chunk, n, v, rows.element_size(), false);
  const int64_t tasks = cpu_tasks(v, c_max);
  const bool avx2 = use_avx2();
  // the row states of each task's run of columns, merged in column order at the end
  const RowAcc empty{-std::numeric_limits<float>::infinity(), 0, 0.0, 0.0};
  std::vector<RowAcc> parts(tasks * n, empty);
  const auto dtype = rows.scalar_type();
  for_each_block_cpu(rows, weight, c_max, tasks, [&](int64_t task, int64_t v0, const Tensor& x) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "off_ramp_cpu", [&] {
      reduce_block_cpu<scalar_t>(x.data_ptr<scalar_t>(), n, x.size(1), v0, avx2,
                                 parts.data() + task * n);
    });
  });
  RowAcc* acc = parts.data();
  for (int64_t task = 1; task < tasks; ++task) {
    for (int64_t r = 0; r < n; ++r) merge_acc(acc[r], parts[task * n + r]);
  }
  int64_t* tok_p = token.data_ptr<int64_t>();
  float* prob_p = prob.data_ptr<float>();
  float* ent_p = entropy.data_ptr<float>();
  bool* exit_p = exit_mask.data_ptr<bool>();
  for (int64_t r = 0; r < n; ++r) {
    const RowAcc& a = acc[r];
    float h = static_cast<float>(std::log(a.s) - a.t / a.s);
    h = h < 0.f ? 0.f : h;  // NaN stays NaN, as in clamp_min
    const float p = static_cast<float>(1.0 / a.s);
    tok_p[r] = a.idx;
    prob_p[r] = p;
    ent_p[r] = h;
    exit_p[r] = exit_rule(signal, h, p, threshold);
  }
}

void scatter_rows_cpu(const Tensor& rows, const Tensor& index, Tensor& out) {
  const int64_t n = rows.size(0), row_bytes = rows.size(1) * rows.element_size();
  const auto* src = static_cast<const char*>(rows.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + idx[i] * row_bytes, src + i * row_bytes, row_bytes);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// CUDA path

#ifdef WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "off_ramp: ", what, " failed: ", cudaGetErrorString(err));
}

OffRampDtype kernel_dtype(at::ScalarType t) {
  return t == at::kFloat ? kOffRampF32 : (t == at::kBFloat16 ? kOffRampBF16 : kOffRampF16);
}

void off_ramp_cuda(const Tensor& rows, const Tensor& weight, float threshold, ExitSignal signal,
                   int64_t chunk,
                   const Tensor* index, Tensor* out_state, Tensor& token, Tensor& prob,
                   Tensor& entropy, Tensor& exit_mask) {
  const int64_t n = rows.size(0), v = weight.size(0);
  const int64_t c_max = chunk_columns(chunk, n, v, rows.element_size(), true);
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, rows.get_device()),
             "cudaDeviceGetAttribute");
  // Split each chunk's columns over several warps per row when N alone cannot fill the GPU.
  const int64_t warps = static_cast<int64_t>(sms) * 48;
  const int splits = static_cast<int>(
      std::clamp<int64_t>((warps + n - 1) / n, 1, std::max<int64_t>(1, c_max / 1024)));
  auto f32 = rows.options().dtype(at::kFloat);
  auto ws = at::empty({3 * splits * n}, f32);
  auto ws_idx = at::empty({splits * n}, rows.options().dtype(at::kInt));
  OffRampPartial p{ws.data_ptr<float>(), ws.data_ptr<float>() + splits * n,
                   ws.data_ptr<float>() + 2 * splits * n, ws_idx.data_ptr<int32_t>()};
  // (Reducing chunk k on a second stream while chunk k+1's matmul runs gained under 2% on an
  // H100: cuBLAS fills the GPU. One stream and one buffer, then.)
  auto buf = at::empty({buffer_size(n, c_max)}, rows.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t v0 = 0; v0 < v; v0 += c_max) {
    const int64_t c = std::min(c_max, v - v0);
    auto logits = chunk_matmul(buf, rows, weight, v0, c);
    check_cuda(off_ramp_reduce_chunk(logits.data_ptr(), kernel_dtype(rows.scalar_type()), n, c,
                                     logits.stride(0), v0, splits, v0 == 0, p, stream),
               "reduce kernel");
  }
  const bool copy = out_state != nullptr && index != nullptr;
  const OffRampSignal rule = signal == ExitSignal::kMaxProb ? kOffRampMaxProb : kOffRampEntropy;
  check_cuda(off_ramp_finalize(p, n, splits, threshold, rule, token.data_ptr<int64_t>(),
                               prob.data_ptr<float>(), entropy.data_ptr<float>(),
                               exit_mask.data_ptr<bool>(), rows.data_ptr(),
                               copy ? index->data_ptr<int64_t>() : nullptr,
                               copy ? out_state->data_ptr() : nullptr,
                               rows.size(1) * rows.element_size(), stream),
             "finalize kernel");
}
#endif

// ---------------------------------------------------------------------------------------------

Output off_ramp(const Tensor& hidden, const Tensor& weight, double threshold,
                const c10::optional<Tensor>& index_arg, const c10::optional<Tensor>& state,
                int64_t chunk, const std::string& signal_name) {
  check_args(hidden, weight, index_arg, state);
  const ExitSignal signal = parse_signal(signal_name);
  const at::NoGradGuard no_grad;  // inference only: the dispatcher sends autograd to the reference
  const bool cuda = hidden.is_cuda();
#ifdef WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> guard;
  if (cuda) guard.emplace(hidden.device());
#else
  TORCH_CHECK(!cuda, "off_ramp: this extension was built without CUDA; got a CUDA tensor");
#endif
  TORCH_CHECK(hidden.device().is_cpu() || cuda, "off_ramp: unsupported device ", hidden.device());

  c10::optional<Tensor> index;
  if (index_arg) index = index_arg->contiguous();
  // index_select also bounds-checks index, which the kernels then rely on
  const Tensor rows = index ? hidden.index_select(0, *index) : hidden.contiguous();
  const int64_t n = rows.size(0);
  auto opts = hidden.options();
  Tensor token = at::empty({n}, opts.dtype(at::kLong));
  Tensor prob = at::empty({n}, opts.dtype(at::kFloat));
  Tensor entropy = at::empty({n}, opts.dtype(at::kFloat));
  Tensor exit_mask = at::empty({n}, opts.dtype(at::kBool));
  c10::optional<Tensor> out_state;
  if (state) {
    out_state = (index ? *state : hidden).clone(at::MemoryFormat::Contiguous);
  }
  if (n == 0) return {token, prob, entropy, exit_mask, out_state};

  const float thr = static_cast<float>(threshold);  // the reference compares in float32 too
  if (cuda) {
#ifdef WITH_CUDA
    off_ramp_cuda(rows, weight, thr, signal, chunk, index ? &*index : nullptr,
                  out_state ? &*out_state : nullptr, token, prob, entropy, exit_mask);
#endif
  } else {
    off_ramp_cpu(rows, weight, thr, signal, chunk, token, prob, entropy, exit_mask);
    if (out_state && index) scatter_rows_cpu(rows, *index, *out_state);
  }
  return {token, prob, entropy, exit_mask, out_state};
}

// The logits exactly as off_ramp computes them, gathered into [N, V] float32: lets the tests check
// the reduction alone tightly, apart from matmul rounding (test use only: it holds [N, V]).
Tensor chunk_logits(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& index,
                    int64_t chunk) {
  check_args(hidden, weight, index, c10::nullopt);
  const at::NoGradGuard no_grad;
#ifdef WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> guard;
  if (hidden.is_cuda()) guard.emplace(hidden.device());
#endif
  const Tensor rows = index ? hidden.index_select(0, *index) : hidden.contiguous();
  const int64_t n = rows.size(0), v = weight.size(0);
  auto out = at::empty({n, v}, rows.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int64_t c_max = chunk_columns(chunk, n, v, rows.element_size(), rows.is_cuda());
  if (!rows.is_cuda()) {  // the same GEMMs in the same threads as off_ramp_cpu
    for_each_block_cpu(rows, weight, c_max, cpu_tasks(v, c_max),
                       [&](int64_t, int64_t v0, const Tensor& logits) {
                         out.narrow(1, v0, logits.size(1)).copy_(logits);
                       });
    return out;
  }
  auto buf = at::empty({buffer_size(n, c_max)}, rows.options());
  for (int64_t v0 = 0; v0 < v; v0 += c_max) {
    const int64_t c = std::min(c_max, v - v0);
    out.narrow(1, v0, c).copy_(chunk_matmul(buf, rows, weight, v0, c));
  }
  return out;
}

// Errors leave the module as a returned message that _ext.py raises: on the H100 machine (torch
// 2.11, Python 3.12) a C++ exception crossing pybind11 out of this JIT-built module killed the
// process with SIGSEGV instead of raising.
template <typename F>
py::tuple guarded(F&& f) {
  std::string error;
  try {
    return py::make_tuple(py::none(), f());
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown C++ exception";
  }
  return py::make_tuple(error, py::none());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ELMER fused off-ramp: chunked online softmax / argmax / entropy + masked state copy. "
            "Functions return (error message or None, result).";
  m.def(
      "off_ramp",
      [](const Tensor& hidden, const Tensor& weight, double threshold,
         const c10::optional<Tensor>& index, const c10::optional<Tensor>& state, int64_t chunk,
         const std::string& signal) {
        return guarded(
            [&] { return off_ramp(hidden, weight, threshold, index, state, chunk, signal); });
      },
      "See elmer_fairseq.ops.off_ramp.off_ramp_reference.", py::arg("hidden"), py::arg("weight"),
      py::arg("threshold"), py::arg("index") = py::none(), py::arg("state") = py::none(),
      py::arg("chunk") = 0, py::arg("signal") = "entropy");
  m.def(
      "chunk_logits",
      [](const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& index,
         int64_t chunk) { return guarded([&] { return chunk_logits(hidden, weight, index, chunk); }); },
      "The chunked logits as off_ramp computes them (tests).", py::arg("hidden"),
      py::arg("weight"), py::arg("index") = py::none(), py::arg("chunk") = 0);
  m.def("chunk_columns", &chunk_columns, "Columns per vocabulary chunk (chunk <= 0: automatic).",
        py::arg("chunk"), py::arg("n"), py::arg("v"), py::arg("elem"), py::arg("cuda"));
  m.def(
      "cpu_simd",
      [](int64_t on) {
        if (on >= 0) cpu_simd.store(on ? 1 : 0);
        return use_avx2();
      },
      "Whether the CPU path uses its AVX2 sweeps (the CPU has AVX2 + FMA and they are on); "
      "on = 1 / 0 turns them on / off (tests), -1 only asks.",
      py::arg("on") = -1);
  m.def(
      "cpu_split",
      [](int64_t tasks) {
        if (tasks >= 0) cpu_split.store(tasks);
        return cpu_split.load();
      },
      "Runs of vocabulary blocks the CPU path splits into (0: one per thread, the default); "
      "tasks >= 0 sets it (tests), -1 only asks.",
      py::arg("tasks") = -1);
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

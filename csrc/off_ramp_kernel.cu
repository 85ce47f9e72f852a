// Fused off-ramp reductions (ELMER, DESIGN.md "The off-ramp kernel"), free of torch headers so
// that `nvcc -c csrc/off_ramp_kernel.cu` compile-checks it anywhere.
//
// The binding computes logits chunk by chunk (cuBLAS via ATen) into one reused [n, C] buffer;
// off_ramp_reduce_chunk folds each chunk into an online (max, argmax, sum-exp, sum p*logit) state,
// so the [n, V] logits never exist; off_ramp_finalize turns it into token / prob / entropy / exit
// and does the masked state copy in the same launch.
#include "off_ramp_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // one warp per (row, column segment)
constexpr int kSegmentAlign = 8;   // column segments start on 16-byte boundaries for every dtype

struct Acc {
  float m;    // max logit so far
  float s;    // sum exp(l - m); 0 means empty (a non-empty one is >= 1)
  float t;    // sum exp(l - m) * (l - m), <= 0: relative to m so that it never cancels
  int32_t idx;  // lowest column with logit m
};

__device__ __forceinline__ Acc acc_empty() { return {-INFINITY, 0.f, 0.f, INT_MAX}; }

// Combine two disjoint column sets; ties go to the lower column, whatever the order of a and b.
__device__ __forceinline__ Acc acc_merge(Acc a, Acc b) {
  if (b.s == 0.f) return a;
  if (a.s == 0.f) return b;
  const float m = fmaxf(a.m, b.m);
  const float da = a.m - m, db = b.m - m;  // <= 0
  const float ea = __expf(da), eb = __expf(db);
  Acc r;
  r.m = m;
  r.s = a.s * ea + b.s * eb;
  r.t = (a.t + da * a.s) * ea + (b.t + db * b.s) * eb;
  r.idx = a.m > b.m ? a.idx : (b.m > a.m ? b.idx : min(a.idx, b.idx));
  return r;
}

__device__ __forceinline__ Acc warp_merge(Acc a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Acc o;
    o.m = __shfl_down_sync(0xffffffffu, a.m, off);
    o.s = __shfl_down_sync(0xffffffffu, a.s, off);
    o.t = __shfl_down_sync(0xffffffffu, a.t, off);
    o.idx = __shfl_down_sync(0xffffffffu, a.idx, off);
    a = acc_merge(a, o);
  }
  return a;
}

// Fold K consecutive logits (columns col .. col + K - 1, in increasing order) into a lane's state.
template <int K>
__device__ __forceinline__ void acc_consume(Acc& a, const float (&x)[K], int32_t col) {
  float vm = x[0];
  int vi = 0;
#pragma unroll
  for (int k = 1; k < K; ++k) {
    if (x[k] > vm) {  // strict: the first of equal values wins
      vm = x[k];
      vi = k;
    }
  }
  if (vm > a.m || a.s == 0.f) {
    if (a.s == 0.f) {
      a.s = 0.f;
      a.t = 0.f;
    } else {
      const float d = a.m - vm;
      const float e = __expf(d);
      a.t = (a.t + d * a.s) * e;
      a.s *= e;
    }
    a.m = vm;
    a.idx = col + vi;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = x[k] - a.m;
    const float e = __expf(d);
    a.s += e;
    a.t = fmaf(e, d, a.t);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// One 16-byte load, converted to float.
template <typename T>
struct Vec16 {
  static constexpr int K = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&out)[K]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = to_float<T>(v[k]);
  }
};

template <typename T, bool kVec>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    reduce_chunk_kernel(const T* __restrict__ logits, int64_t n, int64_t c, int64_t ld,
                        int32_t v0, int64_t segment, bool first, OffRampPartial p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;  // whole warps leave together
  const int64_t begin = blockIdx.y * segment;
  const int64_t end = min(c, begin + segment);
  const T* x = logits + row * ld;
  Acc a = acc_empty();
  int64_t tail = begin;
  if (kVec) {
    constexpr int K = Vec16<T>::K;
    constexpr int U = 2;  // loads in flight per lane before the first use
    const int64_t vec_end = begin + (end - begin) / K * K;
    for (int64_t j0 = begin + lane * K; j0 < vec_end; j0 += U * kWarp * K) {
      float v[U][K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * kWarp * K;
        if (j < vec_end) Vec16<T>::load(x + j, v[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * kWarp * K;
        if (j < vec_end) acc_consume<K>(a, v[u], v0 + static_cast<int32_t>(j));
      }
    }
    tail = vec_end;  // fewer than K columns left, at the end of the chunk
  }
  {
    for (int64_t j = tail + lane; j < end; j += kWarp) {
      const float v[1] = {to_float<T>(x[j])};
      acc_consume<1>(a, v, v0 + static_cast<int32_t>(j));
    }
  }
  a = warp_merge(a);
  if (lane == 0) {
    const int64_t slot = blockIdx.y * n + row;
    if (!first) a = acc_merge(Acc{p.m[slot], p.s[slot], p.t[slot], p.idx[slot]}, a);
    p.m[slot] = a.m;
    p.s[slot] = a.s;
    p.t[slot] = a.t;
    p.idx[slot] = a.idx;
  }
}

template <typename W>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    finalize_kernel(OffRampPartial p, int64_t n, int splits, float threshold, bool max_prob,
                    int64_t* token, float* prob, float* entropy, bool* exit_mask,
                    const W* __restrict__ rows, const int64_t* __restrict__ index, W* out_state,
                    int64_t row_words) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;
  Acc a = acc_empty();
  for (int k = lane; k < splits; k += kWarp) {
    const int64_t slot = k * n + row;
    a = acc_merge(a, Acc{p.m[slot], p.s[slot], p.t[slot], p.idx[slot]});
  }
  a = warp_merge(a);
  if (lane == 0) {
    float h = logf(a.s) - a.t / a.s;
    h = h < 0.f ? 0.f : h;  // written so that NaN stays NaN, as in clamp_min
    const float pr = 1.f / a.s;
    token[row] = a.idx;
    prob[row] = pr;
    entropy[row] = h;
    // as the reference, in float32: entropy < threshold, or 1 - prob < threshold
    exit_mask[row] = max_prob ? __fsub_rn(1.f, pr) < threshold : h < threshold;
  }
  if (out_state != nullptr) {
    const W* src = rows + row * row_words;
    W* dst = out_state + index[row] * row_words;
    for (int64_t j = lane; j < row_words; j += kWarp) dst[j] = src[j];
  }
}

template <typename T>
cudaError_t launch_reduce(const void* logits, int64_t n, int64_t c, int64_t ld, int64_t v0,
                          int splits, bool first, OffRampPartial p, cudaStream_t stream) {
  int64_t segment = (c + splits - 1) / splits;
  segment = (segment + kSegmentAlign - 1) / kSegmentAlign * kSegmentAlign;
  const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock), splits);
  const dim3 block(kWarp * kWarpsPerBlock);
  const T* x = static_cast<const T*>(logits);
  const bool vec = ld % Vec16<T>::K == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const int32_t col0 = static_cast<int32_t>(v0);
  if (vec) {
    reduce_chunk_kernel<T, true><<<grid, block, 0, stream>>>(x, n, c, ld, col0, segment, first, p);
  } else {
    reduce_chunk_kernel<T, false><<<grid, block, 0, stream>>>(x, n, c, ld, col0, segment, first, p);
  }
  return cudaGetLastError();
}

template <typename W>
cudaError_t launch_finalize(OffRampPartial p, int64_t n, int splits, float threshold,
                            bool max_prob, int64_t* token, float* prob, float* entropy,
                            bool* exit_mask, const void* rows, const int64_t* index,
                            void* out_state, int64_t row_bytes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock));
  finalize_kernel<W><<<grid, kWarp * kWarpsPerBlock, 0, stream>>>(
      p, n, splits, threshold, max_prob, token, prob, entropy, exit_mask,
      static_cast<const W*>(rows), index, static_cast<W*>(out_state),
      row_bytes / static_cast<int64_t>(sizeof(W)));
  return cudaGetLastError();
}

bool aligned(const void* ptr, int64_t bytes, int64_t a) {
  return reinterpret_cast<uintptr_t>(ptr) % a == 0 && bytes % a == 0;
}

}  // namespace

cudaError_t off_ramp_reduce_chunk(const void* logits, OffRampDtype dtype, int64_t n, int64_t c,
                                  int64_t ld, int64_t v0, int splits, bool first,
                                  OffRampPartial partial, cudaStream_t stream) {
  if (n <= 0 || c <= 0) return cudaSuccess;
  if (splits < 1 || splits > 65535 || v0 + c > INT_MAX || ld < c) return cudaErrorInvalidValue;
  switch (dtype) {
    case kOffRampF32:
      return launch_reduce<float>(logits, n, c, ld, v0, splits, first, partial, stream);
    case kOffRampBF16:
      return launch_reduce<__nv_bfloat16>(logits, n, c, ld, v0, splits, first, partial, stream);
    case kOffRampF16:
      return launch_reduce<__half>(logits, n, c, ld, v0, splits, first, partial, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t off_ramp_finalize(OffRampPartial partial, int64_t n, int splits, float threshold,
                              OffRampSignal signal, int64_t* token, float* prob, float* entropy,
                              bool* exit_mask, const void* rows, const int64_t* index,
                              void* out_state, int64_t row_bytes, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (signal != kOffRampEntropy && signal != kOffRampMaxProb) return cudaErrorInvalidValue;
  const bool max_prob = signal == kOffRampMaxProb;
  const bool copy = out_state != nullptr && row_bytes > 0;
  if (!copy) {
    out_state = nullptr;
    row_bytes = 0;
  }
  // widest word that divides the rows and both base addresses
  auto launch = [&](auto word) {
    using W = decltype(word);
    return launch_finalize<W>(partial, n, splits, threshold, max_prob, token, prob, entropy,
                              exit_mask, rows, index, out_state, row_bytes, stream);
  };
  if (!copy || (aligned(rows, row_bytes, 16) && aligned(out_state, row_bytes, 16))) {
    return launch(uint4{});
  }
  if (aligned(rows, row_bytes, 4) && aligned(out_state, row_bytes, 4)) return launch(uint32_t{});
  if (aligned(rows, row_bytes, 2) && aligned(out_state, row_bytes, 2)) return launch(uint16_t{});
  return launch(static_cast<unsigned char>(0));
}

// Launcher API of the fused off-ramp CUDA kernels (off_ramp_kernel.cu). Plain CUDA C++, no torch:
// the binding (off_ramp.cpp) owns the tensors and passes raw pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

enum OffRampDtype : int { kOffRampF32 = 0, kOffRampBF16 = 1, kOffRampF16 = 2 };

// The exit rule: entropy < threshold, or 1 - prob(argmax) < threshold (max-prob), in float32.
enum OffRampSignal : int { kOffRampEntropy = 0, kOffRampMaxProb = 1 };

// Running reduction over the vocabulary, `splits` slots per row, each array [splits * n]
// (slot k of row r at k * n + r). m: max logit; idx: lowest column attaining it; s: sum exp(l - m);
// t: sum exp(l - m) * (l - m), so that entropy = log s - t / s and prob(argmax) = 1 / s.
struct OffRampPartial {
  float* m;
  float* s;
  float* t;
  int32_t* idx;
};

// Folds one logits chunk [n, c] (row-major with row stride ld >= c, columns v0 .. v0 + c - 1 of
// the vocabulary) into the partial state. Column segment k of every row goes to slot k; `first`
// starts the slots afresh.
cudaError_t off_ramp_reduce_chunk(const void* logits, OffRampDtype dtype, int64_t n, int64_t c,
                                  int64_t ld, int64_t v0, int splits, bool first,
                                  OffRampPartial partial, cudaStream_t stream);

// Merges the slots and writes token [n] int64, prob / entropy [n] float, exit [n] bool
// (entropy < threshold, or 1 - prob < threshold under kOffRampMaxProb). If out_state is not null,
// also copies row i of `rows` ([n] rows of row_bytes bytes) to row index[i] of out_state (which
// already holds a copy of the state).
cudaError_t off_ramp_finalize(OffRampPartial partial, int64_t n, int splits, float threshold,
                              OffRampSignal signal, int64_t* token, float* prob, float* entropy,
                              bool* exit_mask, const void* rows, const int64_t* index,
                              void* out_state, int64_t row_bytes, cudaStream_t stream);

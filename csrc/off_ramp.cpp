// Torch binding of the fused off-ramp (elmer_fairseq/ops/off_ramp.py is the specification).
//
// Both paths walk the vocabulary in chunks of C columns: logits = rows @ weight[v0:v0+C].T by ATen
// in the input dtype (as the reference does), then fold the chunk into a per-row online state
// (max, lowest argmax, sum exp, sum exp * logit), so at most [N, C] logits exist at a time.
// Built without WITH_CUDA this is the CPU-only extension; with it, off_ramp_kernel.cu serves
// CUDA tensors.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "off_ramp_kernel.h"
#endif

namespace {

using at::Tensor;
using Output = std::tuple<Tensor, Tensor, Tensor, Tensor, c10::optional<Tensor>>;

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
// did not pay). CPU: a 4 MiB buffer. Peak memory stays O(N*d + N*C) either way.
int64_t chunk_columns(int64_t chunk, int64_t n, int64_t v, int64_t elem, bool cuda) {
  if (chunk > 0) return std::min(chunk, v);
  n = std::max<int64_t>(n, 1);
  if (!cuda) return std::min(v, std::max<int64_t>(64, (int64_t{4} << 20) / n / elem / 64 * 64));
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

template <typename T>
void reduce_chunk_cpu(const T* x, int64_t n, int64_t c, int64_t v0, float* m, double* s,
                      double* t, int64_t* idx) {
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / c), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * c;
      float cm = static_cast<float>(row[0]);
      int64_t ci = 0;
      for (int64_t j = 1; j < c; ++j) {
        const float v = static_cast<float>(row[j]);
        if (v > cm) {  // strict: the lowest column wins ties
          cm = v;
          ci = j;
        }
      }
      if (s[r] == 0.0 || cm > m[r]) {
        if (s[r] != 0.0) {  // rescale what was summed relative to the old max
          const double d = static_cast<double>(m[r]) - cm;
          const double e = std::exp(d);
          t[r] = (t[r] + d * s[r]) * e;
          s[r] *= e;
        }
        m[r] = cm;
        idx[r] = v0 + ci;
      }
      const float mr = m[r];
      double ss = 0.0, tt = 0.0;
      for (int64_t j = 0; j < c; ++j) {
        const float d = static_cast<float>(row[j]) - mr;
        const float e = std::exp(d);
        ss += e;
        tt += static_cast<double>(e) * d;
      }
      s[r] += ss;
      t[r] += tt;
    }
  });
}

void off_ramp_cpu(const Tensor& rows, const Tensor& weight, float threshold, int64_t chunk,
                  Tensor& token, Tensor& prob, Tensor& entropy, Tensor& exit_mask) {
  const int64_t n = rows.size(0), v = weight.size(0);
  const int64_t c_max = chunk_columns(chunk, n, v, rows.element_size(), false);
  auto m = at::full({n}, -std::numeric_limits<float>::infinity(), rows.options().dtype(at::kFloat));
  auto s = at::zeros({n}, rows.options().dtype(at::kDouble));
  auto t = at::zeros({n}, rows.options().dtype(at::kDouble));
  auto buf = at::empty({buffer_size(n, c_max)}, rows.options());
  for (int64_t v0 = 0; v0 < v; v0 += c_max) {
    const int64_t c = std::min(c_max, v - v0);
    auto logits = chunk_matmul(buf, rows, weight, v0, c);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "off_ramp_cpu", [&] {
      reduce_chunk_cpu<scalar_t>(logits.data_ptr<scalar_t>(), n, c, v0, m.data_ptr<float>(),
                                 s.data_ptr<double>(), t.data_ptr<double>(),
                                 token.data_ptr<int64_t>());
    });
  }
  const double* sp = s.data_ptr<double>();
  const double* tp = t.data_ptr<double>();
  float* prob_p = prob.data_ptr<float>();
  float* ent_p = entropy.data_ptr<float>();
  bool* exit_p = exit_mask.data_ptr<bool>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float h = static_cast<float>(std::log(sp[r]) - tp[r] / sp[r]);
      h = h < 0.f ? 0.f : h;  // NaN stays NaN, as in clamp_min
      prob_p[r] = static_cast<float>(1.0 / sp[r]);
      ent_p[r] = h;
      exit_p[r] = h < threshold;
    }
  });
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

void off_ramp_cuda(const Tensor& rows, const Tensor& weight, float threshold, int64_t chunk,
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
  check_cuda(off_ramp_finalize(p, n, splits, threshold, token.data_ptr<int64_t>(),
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
                int64_t chunk) {
  check_args(hidden, weight, index_arg, state);
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
    off_ramp_cuda(rows, weight, thr, chunk, index ? &*index : nullptr,
                  out_state ? &*out_state : nullptr, token, prob, entropy, exit_mask);
#endif
  } else {
    off_ramp_cpu(rows, weight, thr, chunk, token, prob, entropy, exit_mask);
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
         const c10::optional<Tensor>& index, const c10::optional<Tensor>& state, int64_t chunk) {
        return guarded([&] { return off_ramp(hidden, weight, threshold, index, state, chunk); });
      },
      "See elmer_fairseq.ops.off_ramp.off_ramp_reference.", py::arg("hidden"), py::arg("weight"),
      py::arg("threshold"), py::arg("index") = py::none(), py::arg("state") = py::none(),
      py::arg("chunk") = 0);
  m.def(
      "chunk_logits",
      [](const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& index,
         int64_t chunk) { return guarded([&] { return chunk_logits(hidden, weight, index, chunk); }); },
      "The chunked logits as off_ramp computes them (tests).", py::arg("hidden"),
      py::arg("weight"), py::arg("index") = py::none(), py::arg("chunk") = 0);
  m.def("chunk_columns", &chunk_columns, "Columns per vocabulary chunk (chunk <= 0: automatic).",
        py::arg("chunk"), py::arg("n"), py::arg("v"), py::arg("elem"), py::arg("cuda"));
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

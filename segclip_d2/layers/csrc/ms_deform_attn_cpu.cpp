// CPU kernels of multi-scale deformable attention: dispatch over dtype and instruction set.
//
// The kernel bodies (ms_deform_attn_cpu_kernels.inc) are compiled three times: a baseline copy
// (the compiler's default flags, e.g. SSE2 on x86-64) and, with GCC/Clang on x86-64, an AVX2+FMA
// copy and an AVX-512 copy, one of which is selected at run time from what the CPU supports.
// The source is the same; only the instructions the compiler may use differ (measured on an AMD
// EPYC, the op's time in the six encoder layers of the R50 model at 1024 x 1024: AVX-512 80 ms
// vs AVX2 104 ms with bf16 values, 77 vs 84 ms with float32). Parallelism comes from ATen's
// at::parallel_for (no OpenMP pragmas here; see setup.py for why the OpenMP flag is still
// passed).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <atomic>
#include <string>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(SEGCLIP_NO_AVX2)
#define SEGCLIP_HAVE_X86_COPIES 1
#endif

namespace segclip {

// Sizes of one call (shared by the instruction-set copies of the kernels).
struct Dims {
  int64_t B, S, H, Dh, Q, L, P;
};

namespace cpu_baseline {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace cpu_baseline

#ifdef SEGCLIP_HAVE_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
namespace cpu_avx2 {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace cpu_avx2
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#ifdef __clang__
#pragma clang attribute push( \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#endif
namespace cpu_avx512 {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace cpu_avx512
#ifdef __clang__
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2+fma";
    default:
      return "baseline";
  }
}

// The best copy this build and this CPU can run.
Isa best_isa() {
#ifdef SEGCLIP_HAVE_X86_COPIES
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx2;
    }
    return Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;
#endif
}

// -1: automatic (best_isa); otherwise a forced copy (tests run every copy on one machine).
std::atomic<int> g_forced_isa{-1};

Isa current_isa() {
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced < 0 ? best_isa() : static_cast<Isa>(forced);
}

Dims read_dims(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Dims{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
}

}  // namespace

// Calls the kernel function `__VA_ARGS__` of the instruction-set copy in use.
#ifdef SEGCLIP_HAVE_X86_COPIES
#define SEGCLIP_CALL_ISA_COPY(...)     \
  switch (current_isa()) {             \
    case Isa::kAvx512:                 \
      cpu_avx512::__VA_ARGS__;         \
      break;                           \
    case Isa::kAvx2:                   \
      cpu_avx2::__VA_ARGS__;           \
      break;                           \
    default:                           \
      cpu_baseline::__VA_ARGS__;       \
  }
#else
#define SEGCLIP_CALL_ISA_COPY(...) cpu_baseline::__VA_ARGS__
#endif

std::string cpu_kernel_isa() {
  return isa_name(current_isa());
}

std::vector<std::string> cpu_kernel_available_isas() {
  std::vector<std::string> names;
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) {
    names.emplace_back(isa_name(static_cast<Isa>(i)));
  }
  return names;
}

void cpu_kernel_force_isa(const std::string& name) {
  if (name.empty()) {
    g_forced_isa.store(-1, std::memory_order_relaxed);
    return;
  }
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) {
    if (name == isa_name(static_cast<Isa>(i))) {
      g_forced_isa.store(i, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK(
      false,
      "ms_deform_attn: CPU kernel copy '",
      name,
      "' is not available on this machine/build (best: ",
      isa_name(best_isa()),
      ")");
}

at::Tensor ms_deform_attn_forward_cpu(const MsdaInputs& in) {
  const auto d = read_dims(in.value, in.sampling_locations);
  const int64_t* sh = in.spatial_shapes.data_ptr<int64_t>();
  const int64_t* st = in.level_start_index.data_ptr<int64_t>();
  if (in.value.scalar_type() == at::kBFloat16) {
    // bf16 values (reduced-precision inference), float32 locations, weights and output: half
    // the memory traffic of converting the values to float32 first, and the same result
    auto out = at::empty({d.B, d.Q, d.H * d.Dh}, in.sampling_locations.options());
    const auto* v = reinterpret_cast<const uint16_t*>(in.value.data_ptr<at::BFloat16>());
    const float* sl = in.sampling_locations.data_ptr<float>();
    const float* aw = in.attention_weights.data_ptr<float>();
    float* o = out.data_ptr<float>();
    SEGCLIP_CALL_ISA_COPY(forward<float, uint16_t>(d, v, sh, st, sl, aw, o));
    return out;
  }
  // every element is written by the kernel (no zero fill: one pass over `out` less)
  auto out = at::empty({d.B, d.Q, d.H * d.Dh}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* v = in.value.data_ptr<scalar_t>();
    const scalar_t* sl = in.sampling_locations.data_ptr<scalar_t>();
    const scalar_t* aw = in.attention_weights.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    SEGCLIP_CALL_ISA_COPY(forward<scalar_t, scalar_t>(d, v, sh, st, sl, aw, o));
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const MsdaInputs& in, const at::Tensor& grad_output) {
  const auto d = read_dims(in.value, in.sampling_locations);
  auto grad_value = at::zeros_like(in.value);
  auto grad_loc = at::zeros_like(in.sampling_locations);
  auto grad_attn = at::zeros_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES(in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const scalar_t* v = in.value.data_ptr<scalar_t>();
    const int64_t* sh = in.spatial_shapes.data_ptr<int64_t>();
    const int64_t* st = in.level_start_index.data_ptr<int64_t>();
    const scalar_t* sl = in.sampling_locations.data_ptr<scalar_t>();
    const scalar_t* aw = in.attention_weights.data_ptr<scalar_t>();
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gv = grad_value.data_ptr<scalar_t>();
    scalar_t* gl = grad_loc.data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.data_ptr<scalar_t>();
    SEGCLIP_CALL_ISA_COPY(backward<scalar_t>(d, v, sh, st, sl, aw, go, gv, gl, ga));
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace segclip

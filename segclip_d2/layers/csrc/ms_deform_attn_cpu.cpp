// CPU kernels of multi-scale deformable attention: dispatch over dtype and instruction set.
//
// The kernel bodies (ms_deform_attn_cpu_kernels.inc) are compiled twice: a baseline copy (the
// compiler's default flags, e.g. SSE2 on x86-64) and, with GCC/Clang on x86-64, an AVX2+FMA copy
// selected at run time when the CPU supports it. Parallelism comes from ATen's at::parallel_for
// (no OpenMP pragmas here; see setup.py for why the OpenMP flag is still passed).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <atomic>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(SEGCLIP_NO_AVX2)
#define SEGCLIP_HAVE_AVX2_COPY 1
#endif

namespace segclip {

namespace cpu_baseline {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace cpu_baseline

#ifdef SEGCLIP_HAVE_AVX2_COPY
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
#endif

namespace {

std::atomic<bool> g_force_baseline{false};  // tests run both copies on one machine

bool use_avx2() {
#ifdef SEGCLIP_HAVE_AVX2_COPY
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && !g_force_baseline.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

cpu_baseline::Dims read_dims(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return cpu_baseline::Dims{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.size(1),
      sampling_locations.size(3),
      sampling_locations.size(4)};
}

}  // namespace

bool cpu_kernel_uses_avx2() {
  return use_avx2();
}

void cpu_kernel_force_baseline(bool force) {
  g_force_baseline.store(force, std::memory_order_relaxed);
}

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const auto d = read_dims(value, sampling_locations);
  // every element is written by the kernel (no zero fill: one pass over `out` less)
  auto out = at::empty({d.B, d.Q, d.H * d.Dh}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* v = value.data_ptr<scalar_t>();
    const int64_t* sh = spatial_shapes.data_ptr<int64_t>();
    const int64_t* st = level_start_index.data_ptr<int64_t>();
    const scalar_t* sl = sampling_locations.data_ptr<scalar_t>();
    const scalar_t* aw = attention_weights.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
#ifdef SEGCLIP_HAVE_AVX2_COPY
    if (use_avx2()) {
      const cpu_avx2::Dims d2{d.B, d.S, d.H, d.Dh, d.Q, d.L, d.P};
      cpu_avx2::forward<scalar_t>(d2, v, sh, st, sl, aw, o);
      return;
    }
#endif
    cpu_baseline::forward<scalar_t>(d, v, sh, st, sl, aw, o);
  });
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const auto d = read_dims(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const scalar_t* v = value.data_ptr<scalar_t>();
    const int64_t* sh = spatial_shapes.data_ptr<int64_t>();
    const int64_t* st = level_start_index.data_ptr<int64_t>();
    const scalar_t* sl = sampling_locations.data_ptr<scalar_t>();
    const scalar_t* aw = attention_weights.data_ptr<scalar_t>();
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gv = grad_value.data_ptr<scalar_t>();
    scalar_t* gl = grad_loc.data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.data_ptr<scalar_t>();
#ifdef SEGCLIP_HAVE_AVX2_COPY
    if (use_avx2()) {
      const cpu_avx2::Dims d2{d.B, d.S, d.H, d.Dh, d.Q, d.L, d.P};
      cpu_avx2::backward<scalar_t>(d2, v, sh, st, sl, aw, go, gv, gl, ga);
      return;
    }
#endif
    cpu_baseline::backward<scalar_t>(d, v, sh, st, sl, aw, go, gv, gl, ga);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace segclip

// Multi-scale deformable attention op: declarations shared by the bindings and the kernels.
#pragma once

#include <ATen/core/Tensor.h>  // light header: keeps the build short

#include <string>
#include <vector>

namespace segclip {

// The op's inputs: value (B, S, H, Dh), spatial_shapes (L, 2) int64, level_start_index (L,)
// int64, sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P). value may
// also be bfloat16 with float32 locations and weights in the CPU forward (float32 output).
// The references are valid for the call that builds it.
struct MsdaInputs {
  const at::Tensor& value;
  const at::Tensor& spatial_shapes;
  const at::Tensor& level_start_index;
  const at::Tensor& sampling_locations;
  const at::Tensor& attention_weights;
};

// -> (B, Q, H * Dh)
at::Tensor ms_deform_attn_forward_cpu(const MsdaInputs& in);

// -> {grad_value (B, S, H, Dh), grad_sampling_locations, grad_attention_weights}
std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const MsdaInputs& in, const at::Tensor& grad_output);

// Instruction-set copy of the CPU kernels in use: "avx512", "avx2+fma" or "baseline".
std::string cpu_kernel_isa();

// The copies this build can run on this CPU, baseline first.
std::vector<std::string> cpu_kernel_available_isas();

// Forces one of cpu_kernel_available_isas() ("" = automatic); tests compare the copies.
void cpu_kernel_force_isa(const std::string& name);

#ifdef WITH_CUDA
// the same on CUDA tensors (float32 / float64 only)
at::Tensor ms_deform_attn_forward_cuda(const MsdaInputs& in);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(
    const MsdaInputs& in, const at::Tensor& grad_output);
#endif

}  // namespace segclip

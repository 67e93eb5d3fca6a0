// Multi-scale deformable attention op: declarations shared by the bindings and the kernels.
#pragma once

#include <ATen/core/Tensor.h>  // light header: keeps the build short

#include <vector>

namespace segclip {

// value (B, S, H, Dh), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
// sampling_locations (B, Q, H, L, P, 2), attention_weights (B, Q, H, L, P) -> (B, Q, H * Dh)
at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// -> {grad_value (B, S, H, Dh), grad_sampling_locations, grad_attention_weights}
std::vector<at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// Whether the CPU kernels run their AVX2+FMA copy on this machine (else the baseline copy).
bool cpu_kernel_uses_avx2();

// Forces the baseline copy even on AVX2 machines (tests compare both copies).
void cpu_kernel_force_baseline(bool force);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace segclip

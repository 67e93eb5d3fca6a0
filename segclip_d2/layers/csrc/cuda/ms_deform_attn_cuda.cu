// CUDA kernels of multi-scale deformable attention.
//
// One thread per output element (b, q, h, ch); the threads of one (b, q, h) are consecutive.
// The bilinear math is the shared code of ms_deform_attn_common.h (also used by the CPU kernel).
// Backward: grad_value is scattered with atomicAdd; the per-(b, q, h, l, p) gradients of the
// sampling locations and attention weights are sums over the Dh channels, reduced with warp
// shuffles when Dh divides 32 (one group of Dh lanes = one (b, q, h), one plain store per
// group) and with atomicAdd otherwise.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_common.h"

namespace segclip {
namespace {

constexpr int kThreads = 256;  // multiple of 32: warps never straddle two blocks

constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // the kernels loop (grid stride) beyond

unsigned int num_blocks(int64_t padded_total) {
  const int64_t blocks = (padded_total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename scalar_t>
__global__ void forward_kernel(
    const int64_t total,  // B * Q * H * Dh
    const int64_t S,
    const int64_t Q,
    const int64_t H,
    const int64_t Dh,
    const int64_t L,
    const int64_t P,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t ch = idx % Dh;
    const int64_t bqh = idx / Dh;
    const int64_t h = bqh % H;
    const int64_t b = bqh / (H * Q);
    const int64_t row_stride = H * Dh;
    scalar_t acc = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t Hl = shapes[2 * l];
      const int64_t Wl = shapes[2 * l + 1];
      const scalar_t* vlev = value + ((b * S + starts[l]) * H + h) * Dh;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = (bqh * L + l) * P + p;
        BilinearCorners<scalar_t> c;
        if (!bilinear_corners<scalar_t>(
                loc[2 * i] * scalar_t(Wl) - scalar_t(0.5),
                loc[2 * i + 1] * scalar_t(Hl) - scalar_t(0.5),
                Hl,
                Wl,
                c)) {
          continue;
        }
        const scalar_t* const v[4] = {
            vlev + c.row[0] * row_stride,
            vlev + c.row[1] * row_stride,
            vlev + c.row[2] * row_stride,
            vlev + c.row[3] * row_stride};
        acc += attn[i] * bilinear_sample<scalar_t>(c, v, ch);
      }
    }
    out[idx] = acc;
  }
}

// kShuffle: Dh is a power of two <= 32, so each group of Dh lanes of a warp is one (b, q, h).
template <typename scalar_t, bool kShuffle>
__global__ void backward_kernel(
    const int64_t total,   // B * Q * H * Dh
    const int64_t padded,  // total rounded up to a multiple of 32
    const int64_t S,
    const int64_t Q,
    const int64_t H,
    const int64_t Dh,
    const int64_t L,
    const int64_t P,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_out,
    scalar_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Every lane of a warp runs the same number of iterations (stride and padded are multiples
  // of 32), so the full-mask shuffles below are always executed by the whole warp.
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < padded;
       idx += stride) {
    const bool active = idx < total;
    const int64_t e = active ? idx : total - 1;  // inactive lanes read a valid element
    const int64_t ch = e % Dh;
    const int64_t bqh = e / Dh;
    const int64_t h = bqh % H;
    const int64_t b = bqh / (H * Q);
    const int64_t row_stride = H * Dh;
    const scalar_t go = active ? grad_out[e] : scalar_t(0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t Hl = shapes[2 * l];
      const int64_t Wl = shapes[2 * l + 1];
      const int64_t lev_off = ((b * S + starts[l]) * H + h) * Dh;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = (bqh * L + l) * P + p;
        const scalar_t a = attn[i];
        BilinearCorners<scalar_t> c;
        const bool inside = bilinear_corners<scalar_t>(
            loc[2 * i] * scalar_t(Wl) - scalar_t(0.5),
            loc[2 * i + 1] * scalar_t(Hl) - scalar_t(0.5),
            Hl,
            Wl,
            c);
        scalar_t ga = 0, gx = 0, gy = 0;
        if (inside && active) {
          const scalar_t* vlev = value + lev_off;
          const scalar_t* const v[4] = {
              vlev + c.row[0] * row_stride,
              vlev + c.row[1] * row_stride,
              vlev + c.row[2] * row_stride,
              vlev + c.row[3] * row_stride};
          scalar_t val, ddx, ddy;
          bilinear_sample_and_grad<scalar_t>(c, v, ch, val, ddx, ddy);
          ga = go * val;
          gx = go * ddx;
          gy = go * ddy;
          scalar_t* gvlev = grad_value + lev_off + ch;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) {
              atomicAdd(gvlev + c.row[k] * row_stride, a * c.w[k] * go);
            }
          }
        }
        if (kShuffle) {
          for (int offset = static_cast<int>(Dh) / 2; offset > 0; offset /= 2) {
            ga += __shfl_down_sync(0xffffffffu, ga, offset, static_cast<int>(Dh));
            gx += __shfl_down_sync(0xffffffffu, gx, offset, static_cast<int>(Dh));
            gy += __shfl_down_sync(0xffffffffu, gy, offset, static_cast<int>(Dh));
          }
          if (active && inside && ch == 0) {
            grad_attn[i] = ga;
            grad_loc[2 * i] = a * gx * scalar_t(Wl);
            grad_loc[2 * i + 1] = a * gy * scalar_t(Hl);
          }
        } else if (active && inside) {
          atomicAdd(grad_attn + i, ga);
          atomicAdd(grad_loc + 2 * i, a * gx * scalar_t(Wl));
          atomicAdd(grad_loc + 2 * i + 1, a * gy * scalar_t(Hl));
        }
      }
    }
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const MsdaInputs& in) {
  const at::Tensor& value = in.value;
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), S = value.size(1), H = value.size(2), Dh = value.size(3);
  const int64_t Q = in.sampling_locations.size(1), L = in.sampling_locations.size(3);
  const int64_t P = in.sampling_locations.size(4);
  auto out = at::zeros({B, Q, H * Dh}, value.options());
  const int64_t total = B * Q * H * Dh;
  if (total == 0) {
    return out;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        total,
        S,
        Q,
        H,
        Dh,
        L,
        P,
        value.data_ptr<scalar_t>(),
        in.spatial_shapes.data_ptr<int64_t>(),
        in.level_start_index.data_ptr<int64_t>(),
        in.sampling_locations.data_ptr<scalar_t>(),
        in.attention_weights.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(
    const MsdaInputs& in, const at::Tensor& grad_output) {
  const at::Tensor& value = in.value;
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), S = value.size(1), H = value.size(2), Dh = value.size(3);
  const int64_t Q = in.sampling_locations.size(1), L = in.sampling_locations.size(3);
  const int64_t P = in.sampling_locations.size(4);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(in.sampling_locations);
  auto grad_attn = at::zeros_like(in.attention_weights);
  const int64_t total = B * Q * H * Dh;
  if (total == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  const int64_t padded = (total + 31) / 32 * 32;
  const bool shuffle = Dh <= 32 && (32 % Dh) == 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<num_blocks(padded), kThreads, 0, stream>>>(
          total,
          padded,
          S,
          Q,
          H,
          Dh,
          L,
          P,
          value.data_ptr<scalar_t>(),
          in.spatial_shapes.data_ptr<int64_t>(),
          in.level_start_index.data_ptr<int64_t>(),
          in.sampling_locations.data_ptr<scalar_t>(),
          in.attention_weights.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>());
    };
    if (shuffle) {
      launch(backward_kernel<scalar_t, true>);
    } else {
      launch(backward_kernel<scalar_t, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace segclip

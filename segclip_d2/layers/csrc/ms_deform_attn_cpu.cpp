// CPU kernels of multi-scale deformable attention.
//
// Layout: value (B, S, H, Dh) so that one (position, head) is Dh contiguous channels; every
// inner loop runs over those channels and is auto-vectorised (-O3). Parallelism comes from
// ATen's at::parallel_for (no OpenMP pragmas here):
//   forward  -- over (b, q): each output row (b, q, :) is written by one thread;
//   backward -- over (b, h): each thread owns grad_value[b, :, h, :] exclusively, so the
//               scatter into grad_value needs neither atomics nor locks; the gradients of
//               sampling locations and attention weights are per (b, q, h, l, p).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <type_traits>

#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_common.h"

namespace segclip {
namespace {

// Sizes of one call, read once.
struct Dims {
  int64_t B, S, H, Dh, Q, L, P;
};

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

// kDh > 0: channel count known at compile time (fully unrolled vector code); 0: runtime `dh`.
template <typename scalar_t, int kDh>
void forward_kernel(
    const Dims d,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out) {
  const int64_t Dh = kDh > 0 ? kDh : d.Dh;
  const int64_t row_stride = d.H * Dh;  // distance between two positions of one head
  const int64_t LP = d.L * d.P;
  at::parallel_for(0, d.B * d.Q, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / d.Q;
      for (int64_t h = 0; h < d.H; ++h) {
        scalar_t* __restrict__ o = out + (bq * d.H + h) * Dh;  // (Dh,), zero-initialised
        const int64_t base = (bq * d.H + h) * LP;            // index of (b, q, h, 0, 0)
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t Hl = shapes[2 * l];
          const int64_t Wl = shapes[2 * l + 1];
          const scalar_t* vlev = value + ((b * d.S + starts[l]) * d.H + h) * Dh;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t i = base + l * d.P + p;
            const scalar_t a = attn[i];
            BilinearCorners<scalar_t> c;
            if (!bilinear_corners<scalar_t>(
                    loc[2 * i] * scalar_t(Wl) - scalar_t(0.5),
                    loc[2 * i + 1] * scalar_t(Hl) - scalar_t(0.5),
                    Hl,
                    Wl,
                    c)) {
              continue;
            }
            for (int k = 0; k < 4; ++k) {
              c.w[k] *= a;  // fold the attention weight into the bilinear weights
            }
            const scalar_t* const v[4] = {
                vlev + c.row[0] * row_stride,
                vlev + c.row[1] * row_stride,
                vlev + c.row[2] * row_stride,
                vlev + c.row[3] * row_stride};
            for (int64_t ch = 0; ch < Dh; ++ch) {
              o[ch] += bilinear_sample<scalar_t>(c, v, ch);
            }
          }
        }
      }
    }
  });
}

// Lanes of the partial sums of the channel reductions (lets the compiler vectorise them
// without -ffast-math; the final lane sum changes only the order of additions).
constexpr int kLanes = 16;

template <typename scalar_t, int kDh>
void backward_kernel(
    const Dims d,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    const scalar_t* __restrict__ grad_out,
    scalar_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn) {
  const int64_t Dh = kDh > 0 ? kDh : d.Dh;
  const int64_t row_stride = d.H * Dh;
  const int64_t LP = d.L * d.P;
  const int64_t vec_end = Dh - Dh % kLanes;
  at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / d.H;
      const int64_t h = bh % d.H;
      for (int64_t q = 0; q < d.Q; ++q) {
        const int64_t bqh = (b * d.Q + q) * d.H + h;
        const scalar_t* __restrict__ go = grad_out + bqh * Dh;  // (Dh,)
        const int64_t base = bqh * LP;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t Hl = shapes[2 * l];
          const int64_t Wl = shapes[2 * l + 1];
          const int64_t lev_off = ((b * d.S + starts[l]) * d.H + h) * Dh;
          const scalar_t* vlev = value + lev_off;
          scalar_t* gvlev = grad_value + lev_off;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t i = base + l * d.P + p;
            const scalar_t a = attn[i];
            BilinearCorners<scalar_t> c;
            if (!bilinear_corners<scalar_t>(
                    loc[2 * i] * scalar_t(Wl) - scalar_t(0.5),
                    loc[2 * i + 1] * scalar_t(Hl) - scalar_t(0.5),
                    Hl,
                    Wl,
                    c)) {
              continue;  // no corner inside: all three gradients stay 0
            }
            const scalar_t* const v[4] = {
                vlev + c.row[0] * row_stride,
                vlev + c.row[1] * row_stride,
                vlev + c.row[2] * row_stride,
                vlev + c.row[3] * row_stride};

            // sum_ch go * sample, go * d sample/dx, go * d sample/dy
            scalar_t sa[kLanes] = {}, sx[kLanes] = {}, sy[kLanes] = {};
            for (int64_t c0 = 0; c0 < vec_end; c0 += kLanes) {
              for (int j = 0; j < kLanes; ++j) {
                scalar_t val, ddx, ddy;
                bilinear_sample_and_grad<scalar_t>(c, v, c0 + j, val, ddx, ddy);
                const scalar_t g = go[c0 + j];
                sa[j] += g * val;
                sx[j] += g * ddx;
                sy[j] += g * ddy;
              }
            }
            for (int64_t ch = vec_end; ch < Dh; ++ch) {
              scalar_t val, ddx, ddy;
              bilinear_sample_and_grad<scalar_t>(c, v, ch, val, ddx, ddy);
              sa[0] += go[ch] * val;
              sx[0] += go[ch] * ddx;
              sy[0] += go[ch] * ddy;
            }
            scalar_t ta = 0, tx = 0, ty = 0;
            for (int j = 0; j < kLanes; ++j) {
              ta += sa[j];
              tx += sx[j];
              ty += sy[j];
            }
            grad_attn[i] = ta;
            grad_loc[2 * i] = a * tx * scalar_t(Wl);
            grad_loc[2 * i + 1] = a * ty * scalar_t(Hl);

            // scatter into grad_value[b, :, h, :], owned by this thread
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) {
                continue;
              }
              const scalar_t coef = a * c.w[k];
              scalar_t* __restrict__ gv = gvlev + c.row[k] * row_stride;
              for (int64_t ch = 0; ch < Dh; ++ch) {
                gv[ch] += coef * go[ch];
              }
            }
          }
        }
      }
    }
  });
}

template <typename F>
void dispatch_dh(int64_t dh, F&& f) {
  // Specialise the common head sizes; anything else runs the runtime-size loops.
  switch (dh) {
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    case 64:
      f(std::integral_constant<int, 64>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const Dims d = read_dims(value, sampling_locations);
  auto out = at::zeros({d.B, d.Q, d.H * d.Dh}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    dispatch_dh(d.Dh, [&](auto dh_const) {
      forward_kernel<scalar_t, decltype(dh_const)::value>(
          d,
          value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>());
    });
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
  const Dims d = read_dims(value, sampling_locations);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_locations);
  auto grad_attn = at::zeros_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    dispatch_dh(d.Dh, [&](auto dh_const) {
      backward_kernel<scalar_t, decltype(dh_const)::value>(
          d,
          value.data_ptr<scalar_t>(),
          spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<scalar_t>(),
          attention_weights.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(),
          grad_value.data_ptr<scalar_t>(),
          grad_loc.data_ptr<scalar_t>(),
          grad_attn.data_ptr<scalar_t>());
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace segclip

// Bilinear sampling math shared by the CPU (.cpp) and CUDA (.cu) kernels of multi-scale
// deformable attention, so the code tested on CPU is the code the GPU runs.
//
// Convention (same as F.grid_sample with align_corners=False, padding_mode="zeros"):
// a normalised location u in [0, 1] on a map of size W maps to the pixel coordinate
// x = u * W - 0.5 (pixel i has its centre at x = i); corners outside the map read zeros.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEGCLIP_HD __host__ __device__ __forceinline__
#else
#define SEGCLIP_HD inline
#endif

namespace segclip {

// The four corners around a sampling point on one level.
// Corner k: 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0), 3 = (y1, x1).
// `row[k]` is the flat position y * W + x inside the level, clamped into the map so that it is
// always safe to read; the contribution of a corner outside the map is removed by `valid[k]`
// being false and its coefficients `w`, `dwdx`, `dwdy` being 0 (zero padding).
template <typename scalar_t>
struct BilinearCorners {
  int64_t row[4];
  scalar_t w[4];     // interpolation weights
  scalar_t dwdx[4];  // d w / d x (pixel units)
  scalar_t dwdy[4];  // d w / d y (pixel units)
  bool valid[4];
};

// Fills `c` for the pixel coordinate (x, y) on a (height, width) map. Returns false when no
// corner lies inside the map (the point contributes nothing, also for NaN coordinates).
template <typename scalar_t>
SEGCLIP_HD bool bilinear_corners(
    scalar_t x, scalar_t y, int64_t height, int64_t width, BilinearCorners<scalar_t>& c) {
  // Written so that NaN fails the test.
  if (!(x > scalar_t(-1) && y > scalar_t(-1) && x < scalar_t(width) && y < scalar_t(height))) {
    return false;
  }
  // x, y > -1, so truncation of (x + 1) is floor(x) + 1.
  const int64_t x0 = static_cast<int64_t>(x + scalar_t(1)) - 1;
  const int64_t y0 = static_cast<int64_t>(y + scalar_t(1)) - 1;
  const int64_t x1 = x0 + 1;
  const int64_t y1 = y0 + 1;
  const scalar_t lx = x - scalar_t(x0);  // weight of x1
  const scalar_t ly = y - scalar_t(y0);  // weight of y1
  const scalar_t hx = scalar_t(1) - lx;  // weight of x0
  const scalar_t hy = scalar_t(1) - ly;  // weight of y0

  const bool vx0 = x0 >= 0;
  const bool vx1 = x1 <= width - 1;
  const bool vy0 = y0 >= 0;
  const bool vy1 = y1 <= height - 1;
  const int64_t cx0 = vx0 ? x0 : 0;
  const int64_t cx1 = vx1 ? x1 : width - 1;
  const int64_t cy0 = vy0 ? y0 : 0;
  const int64_t cy1 = vy1 ? y1 : height - 1;

  c.valid[0] = vy0 && vx0;
  c.valid[1] = vy0 && vx1;
  c.valid[2] = vy1 && vx0;
  c.valid[3] = vy1 && vx1;
  c.row[0] = cy0 * width + cx0;
  c.row[1] = cy0 * width + cx1;
  c.row[2] = cy1 * width + cx0;
  c.row[3] = cy1 * width + cx1;

  const scalar_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const scalar_t dx[4] = {-hy, hy, -ly, ly};
  const scalar_t dy[4] = {-hx, -lx, hx, lx};
  for (int k = 0; k < 4; ++k) {
    const scalar_t m = c.valid[k] ? scalar_t(1) : scalar_t(0);
    c.w[k] = w[k] * m;
    c.dwdx[k] = dx[k] * m;
    c.dwdy[k] = dy[k] * m;
  }
  return true;
}

// A value element in the accumulation type. Values are float/double like everything else, or,
// in the CPU forward only, bfloat16 passed as its raw bits (the upper half of a float32, so the
// conversion is exact).
SEGCLIP_HD float value_as_acc(float v) {
  return v;
}
SEGCLIP_HD double value_as_acc(double v) {
  return v;
}
inline float value_as_acc(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// Bilinear sample of channel `ch`: sum_k w_k * v_k[ch]. `v[k]` points at corner k's channels.
template <typename scalar_t, typename value_t = scalar_t>
SEGCLIP_HD scalar_t bilinear_sample(
    const BilinearCorners<scalar_t>& c, const value_t* const v[4], int64_t ch) {
  return c.w[0] * value_as_acc(v[0][ch]) + c.w[1] * value_as_acc(v[1][ch]) +
      c.w[2] * value_as_acc(v[2][ch]) + c.w[3] * value_as_acc(v[3][ch]);
}

// Sample and its spatial derivatives for channel `ch`: value, d value / dx, d value / dy
// (pixel units). The gradient of a location in [0, 1] is these times (W, H).
template <typename scalar_t>
SEGCLIP_HD void bilinear_sample_and_grad(
    const BilinearCorners<scalar_t>& c,
    const scalar_t* const v[4],
    int64_t ch,
    scalar_t& val,
    scalar_t& ddx,
    scalar_t& ddy) {
  const scalar_t a = v[0][ch], b = v[1][ch], d = v[2][ch], e = v[3][ch];
  val = c.w[0] * a + c.w[1] * b + c.w[2] * d + c.w[3] * e;
  ddx = c.dwdx[0] * a + c.dwdx[1] * b + c.dwdx[2] * d + c.dwdx[3] * e;
  ddy = c.dwdy[0] * a + c.dwdy[1] * b + c.dwdy[2] * d + c.dwdy[3] * e;
}

}  // namespace segclip

// Python bindings of segclip_d2._C: input checks and CPU / CUDA dispatch.
#include <torch/python.h>

#include <sstream>
#include <string>
#include <vector>

#include "ms_deform_attn.h"

namespace segclip {
namespace {

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.is_contiguous(),
      "ms_deform_attn: ",
      name,
      " must be contiguous (got sizes ",
      t.sizes(),
      ", strides ",
      t.strides(),
      "); call .contiguous() first");
}

// "[[H_0, W_0], [H_1, W_1], ...]" of a contiguous (L, 2) int64 CPU tensor, or "[a, b, ...]".
std::string int_list(const at::Tensor& t) {
  std::ostringstream os;
  const int64_t* p = t.data_ptr<int64_t>();
  const bool pairs = t.dim() == 2;
  os << "[";
  for (int64_t i = 0; i < t.size(0); ++i) {
    if (i > 0) {
      os << ", ";
    }
    if (pairs) {
      os << "[" << p[2 * i] << ", " << p[2 * i + 1] << "]";
    } else {
      os << p[i];
    }
  }
  os << "]";
  return os.str();
}

void check_same_device(const at::Tensor& t, const at::Tensor& value, const char* name) {
  TORCH_CHECK(
      t.device() == value.device(),
      "ms_deform_attn: ",
      name,
      " is on ",
      t.device(),
      " but value is on ",
      value.device());
}

// Checks every input; throws a RuntimeError naming the offending tensor and its shape.
void check_inputs(const MsdaInputs& in, const at::Tensor* grad_output) {
  const auto& [value, spatial_shapes, level_start_index, sampling_locations, attention_weights] =
      in;
  TORCH_CHECK(
      value.dim() == 4, "ms_deform_attn: value must be (B, S, H, Dh), got sizes ", value.sizes());
  // bf16 values: the CPU forward reads them as float32 (reduced-precision inference)
  const bool bf16_values = value.scalar_type() == at::kBFloat16 && value.is_cpu() &&
      grad_output == nullptr;
  TORCH_CHECK(
      value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble || bf16_values,
      "ms_deform_attn: value must be float32 or float64 (or bfloat16 in the CPU forward), got ",
      value.scalar_type(),
      value.is_cpu() ? std::string() : " on " + value.device().str(),
      " (the Python wrapper casts half precision to float32)");
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (B, Q, H, L, P, 2), got sizes ",
      sampling_locations.sizes());
  TORCH_CHECK(
      attention_weights.dim() == 5,
      "ms_deform_attn: attention_weights must be (B, Q, H, L, P), got sizes ",
      attention_weights.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (L, 2), got sizes ",
      spatial_shapes.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
      spatial_shapes.scalar_type(),
      " and ",
      level_start_index.scalar_type());
  const auto coord_type = bf16_values ? at::kFloat : value.scalar_type();
  TORCH_CHECK(
      sampling_locations.scalar_type() == coord_type &&
          attention_weights.scalar_type() == coord_type,
      "ms_deform_attn: value, sampling_locations and attention_weights must have one dtype "
      "(float32 locations and weights with bfloat16 values), got ",
      value.scalar_type(),
      ", ",
      sampling_locations.scalar_type(),
      ", ",
      attention_weights.scalar_type());

  const int64_t B = value.size(0), S = value.size(1), H = value.size(2);
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(
      sampling_locations.size(0) == B && sampling_locations.size(2) == H &&
          sampling_locations.size(3) == L,
      "ms_deform_attn: sampling_locations ",
      sampling_locations.sizes(),
      " does not match value ",
      value.sizes(),
      " and spatial_shapes ",
      spatial_shapes.sizes(),
      " (expected (B=",
      B,
      ", Q, H=",
      H,
      ", L=",
      L,
      ", P, 2))");
  TORCH_CHECK(
      attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
      "ms_deform_attn: attention_weights ",
      attention_weights.sizes(),
      " must equal sampling_locations ",
      sampling_locations.sizes(),
      " without the last dimension");
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == L,
      "ms_deform_attn: level_start_index must be (L,) with L=",
      L,
      ", got sizes ",
      level_start_index.sizes());
  if (grad_output != nullptr) {
    const int64_t expected[3] = {B, sampling_locations.size(1), H * value.size(3)};
    TORCH_CHECK(
        grad_output->sizes() == at::IntArrayRef(expected) &&
            grad_output->scalar_type() == value.scalar_type(),
        "ms_deform_attn: grad_output must be (B, Q, H*Dh) = ",
        at::IntArrayRef(expected),
        " of dtype ",
        value.scalar_type(),
        ", got ",
        grad_output->sizes(),
        " of dtype ",
        grad_output->scalar_type());
  }

  check_same_device(spatial_shapes, value, "spatial_shapes");
  check_same_device(level_start_index, value, "level_start_index");
  check_same_device(sampling_locations, value, "sampling_locations");
  check_same_device(attention_weights, value, "attention_weights");
  check_contiguous(value, "value");
  check_contiguous(spatial_shapes, "spatial_shapes");
  check_contiguous(level_start_index, "level_start_index");
  check_contiguous(sampling_locations, "sampling_locations");
  check_contiguous(attention_weights, "attention_weights");
  if (grad_output != nullptr) {
    check_same_device(*grad_output, value, "grad_output");
    check_contiguous(*grad_output, "grad_output");
  }

  // Level sizes must tile S exactly, in order (a CUDA tensor is copied: L x 2 numbers).
  const at::Tensor shapes_cpu = spatial_shapes.cpu();
  const at::Tensor starts_cpu = level_start_index.cpu();
  const int64_t* sh = shapes_cpu.data_ptr<int64_t>();
  const int64_t* st = starts_cpu.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(
        sh[2 * l] > 0 && sh[2 * l + 1] > 0,
        "ms_deform_attn: spatial_shapes must be positive, got ",
        int_list(shapes_cpu));
    TORCH_CHECK(
        st[l] == total,
        "ms_deform_attn: level_start_index ",
        int_list(starts_cpu),
        " is not the running sum of H_l*W_l of spatial_shapes ",
        int_list(shapes_cpu));
    total += sh[2 * l] * sh[2 * l + 1];
  }
  TORCH_CHECK(
      total == S,
      "ms_deform_attn: sum of H_l*W_l over spatial_shapes ",
      int_list(shapes_cpu),
      " is ",
      total,
      " but value has S=",
      S,
      " (value sizes ",
      value.sizes(),
      ")");
}

#ifdef WITH_CUDA
#define SEGCLIP_ON_CUDA(call) return call
#else
#define SEGCLIP_ON_CUDA(call) \
  TORCH_CHECK(false, "ms_deform_attn: segclip_d2._C was built without CUDA support")
#endif

at::Tensor forward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaInputs in{
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights};
  check_inputs(in, nullptr);
  if (value.is_cuda()) {
    SEGCLIP_ON_CUDA(ms_deform_attn_forward_cuda(in));
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_forward_cpu(in);
}

// forward's inputs + grad_output
std::vector<at::Tensor> backward(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const MsdaInputs in{
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights};
  check_inputs(in, &grad_output);
  if (value.is_cuda()) {
    SEGCLIP_ON_CUDA(ms_deform_attn_backward_cuda(in, grad_output));
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn: unsupported device ", value.device());
  return ms_deform_attn_backward_cpu(in, grad_output);
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace segclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segclip-d2 compiled ops (multi-scale deformable attention)";
  m.def(
      "ms_deform_attn_forward",
      &segclip::forward,
      "value (B,S,H,Dh), spatial_shapes (L,2), level_start_index (L,), "
      "sampling_locations (B,Q,H,L,P,2), attention_weights (B,Q,H,L,P) -> (B,Q,H*Dh)");
  m.def(
      "ms_deform_attn_backward",
      &segclip::backward,
      "same inputs + grad_output (B,Q,H*Dh) -> [grad_value, grad_sampling_locations, "
      "grad_attention_weights]");
  m.def("with_cuda", &segclip::with_cuda, "whether the CUDA kernels were compiled in");
  m.def(
      "cpu_isa",
      &segclip::cpu_kernel_isa,
      "instruction set of the CPU kernel copy in use: 'avx512', 'avx2+fma' or 'baseline'");
  m.def(
      "cpu_isas",
      &segclip::cpu_kernel_available_isas,
      "the CPU kernel copies this build can run on this machine, baseline first");
  m.def(
      "_force_cpu_isa",
      &segclip::cpu_kernel_force_isa,
      "testing: run the named CPU kernel copy ('' = the best available)");
}

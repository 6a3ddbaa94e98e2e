// ONNX Runtime custom-op library: samg::GuidanceCombine v1 on the CPU execution provider.
//
// Load it with SessionOptions.register_custom_ops_library(path) (Python) or
// Ort::SessionOptions::RegisterCustomOpsLibrary (C++). Built against ORT's C/C++ headers; the C API
// is versioned, so a library built with older headers runs on a newer onnxruntime.
//
// One op object per element type (float32, float16, bfloat16) under the same name: ORT merges them
// into one schema whose type constraint T covers pred_uncond, pred_cond and guided.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "../cpu/guidance_combine.h"

namespace {

constexpr const char* kDomain = "samg";
constexpr const char* kOpType = "GuidanceCombine";

OrtStatusPtr make_error(const OrtApi& api, const std::string& message) {
  return api.CreateStatus(ORT_INVALID_ARGUMENT, ("samg::GuidanceCombine: " + message).c_str());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream text;
  text << "[";
  for (size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << "]";
  return text.str();
}

// The kernel-info getter of each attribute type, and how errors name the type.
OrtStatus* get_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* value) {
  return api.KernelInfoGetAttribute_float(info, name, value);
}
OrtStatus* get_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* value) {
  return api.KernelInfoGetAttribute_int64(info, name, value);
}
const char* type_name(float) { return "a float"; }
const char* type_name(int64_t) { return "an int"; }

// Reads an optional attribute of type T: the op's default when absent, an error when present with the
// Other type (a silent cast would hide a wrong graph).
template <typename T, typename Other>
OrtStatusPtr read_attribute(const OrtApi& api, const OrtKernelInfo* info, const char* name, T fallback, T* value) {
  if (OrtStatus* missing = get_attribute(api, info, name, value)) {
    api.ReleaseStatus(missing);
    Other as_other{};
    if (OrtStatus* absent = get_attribute(api, info, name, &as_other)) {
      api.ReleaseStatus(absent);
      *value = fallback;
      return nullptr;
    }
    return make_error(api, std::string("attribute ") + name + " must be " + type_name(T{}) + " (got " +
                               type_name(Other{}) + ")");
  }
  return nullptr;
}

struct CombineKernel {
  samg_combine_params params{};
  samg_dtype dtype = SAMG_DTYPE_FLOAT32;
  const OrtApi* api = nullptr;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    try {
      return compute(raw_context);
    } catch (const Ort::Exception& error) {
      return make_error(*api, error.what());
    } catch (const std::exception& error) {
      return make_error(*api, error.what());
    }
  }

  OrtStatusPtr compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context{raw_context};
    if (context.GetInputCount() != 3)
      return make_error(*api, "expects 3 inputs (pred_uncond, pred_cond, scales)");
    const Ort::ConstValue u = context.GetInput(0);
    const Ort::ConstValue c = context.GetInput(1);
    const Ort::ConstValue scales = context.GetInput(2);
    const auto u_info = u.GetTensorTypeAndShapeInfo();
    const auto c_info = c.GetTensorTypeAndShapeInfo();
    const auto s_info = scales.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = u_info.GetShape();
    if (c_info.GetShape() != shape)
      return make_error(*api, "pred_cond shape " + shape_text(c_info.GetShape()) + " differs from pred_uncond shape " +
                                  shape_text(shape) + ": both predictions must have the same shape");
    if (s_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return make_error(*api, "scales must be float32 [B, 2] (w_min, w_max)");
    const std::vector<int64_t> scale_shape = s_info.GetShape();
    if (shape.empty() || scale_shape.size() != 2 || scale_shape[0] != shape[0] || scale_shape[1] != 2)
      return make_error(*api, "scales shape " + shape_text(scale_shape) + " must be [B, 2] with B = " +
                                  (shape.empty() ? std::string("?") : std::to_string(shape[0])) +
                                  " (w_min, w_max per sample)");
    samg_combine_layout layout;
    if (const char* problem = samg_combine_make_layout(shape.data(), static_cast<int>(shape.size()), &params, &layout))
      return make_error(*api, std::string(problem) + " (pred_uncond shape " + shape_text(shape) + ")");
    Ort::UnownedValue out = context.GetOutput(0, shape);
    // Work on ORT's intra-op pool: our own threads would compete with its spinning workers.
    auto on_ort_pool = [](void* ort_context, void (*fn)(void*, size_t), size_t count, void* fn_context) {
      static_cast<Ort::KernelContext*>(ort_context)->ParallelFor(fn, count, 0, fn_context);
    };
    const char* problem = samg_guidance_combine_cpu_ex(
        u.GetTensorRawData(), c.GetTensorRawData(), scales.GetTensorData<float>(), out.GetTensorMutableRawData(), dtype,
        shape.data(), static_cast<int>(shape.size()), &params, 0, on_ort_pool, &context);
    return problem ? make_error(*api, problem) : nullptr;
  }
};

struct CombineOp : Ort::CustomOpBase<CombineOp, CombineKernel, /*WithStatus=*/true> {
  explicit CombineOp(ONNXTensorElementDataType element_type, samg_dtype dtype)
      : element_type_(element_type), dtype_(dtype) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const {
    auto kernel = std::make_unique<CombineKernel>();
    kernel->api = &api;
    kernel->dtype = dtype_;
    int64_t smooth = 0, channel_axis = 1;
    if (OrtStatusPtr s = read_attribute<float, int64_t>(api, info, "tau", 1.0f, &kernel->params.tau)) return s;
    if (OrtStatusPtr s = read_attribute<float, int64_t>(api, info, "sharpness", 4.0f, &kernel->params.sharpness)) return s;
    if (OrtStatusPtr s = read_attribute<int64_t, float>(api, info, "smooth", 0, &smooth)) return s;
    if (OrtStatusPtr s = read_attribute<int64_t, float>(api, info, "channel_axis", 1, &channel_axis)) return s;
    if (smooth != 0 && smooth != 3)
      return make_error(api, "attribute smooth=" + std::to_string(smooth) + " is not supported: use 0 (off) or 3");
    if (channel_axis != 1 && channel_axis != 2)
      return make_error(api, "attribute channel_axis=" + std::to_string(channel_axis) +
                                 " is not supported: use 1 ([B, C, ...]) or 2 ([B, F, C, H, W])");
    if (!std::isfinite(kernel->params.tau) || !std::isfinite(kernel->params.sharpness))
      return make_error(api, "attributes tau and sharpness must be finite numbers");
    kernel->params.smooth = static_cast<int>(smooth);
    kernel->params.channel_axis = static_cast<int>(channel_axis);
    *op_kernel = kernel.release();
    return nullptr;
  }

  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& context) {
    // guided has pred_uncond's shape; bad shapes are reported by Compute with the real values.
    Ort::ShapeInferContext::Shape shape = context.GetInputShape(0);
    return context.SetOutputShape(0, shape).release();
  }

  const char* GetName() const { return kOpType; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : element_type_;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return element_type_; }

 private:
  ONNXTensorElementDataType element_type_;
  samg_dtype dtype_;
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // cannot even build a status: ORT older than the headers
  Ort::InitApi(api);
  // The ops and domain must outlive every session that uses them: keep them for the process.
  static CombineOp float_op{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, SAMG_DTYPE_FLOAT32};
  static CombineOp half_op{ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, SAMG_DTYPE_FLOAT16};
  static CombineOp bfloat_op{ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, SAMG_DTYPE_BFLOAT16};
  static std::mutex mutex;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&float_op);
    domain.Add(&half_op);
    domain.Add(&bfloat_op);
    Ort::UnownedSessionOptions session_options{options};
    session_options.Add(domain);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& error) {
    return api->CreateStatus(ORT_FAIL, error.what());
  }
  return nullptr;
}

#include "samg/runtime.h"

#include <onnxruntime_cxx_api.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <stdexcept>

#include "guidance_combine.h"  // plugins/cpu: the host-side combine for raw exports

namespace samg {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<float> scaled(const std::vector<float>& x, double factor) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(x[i] * factor);
  return out;
}

void check_finite(const std::vector<float>& x, const std::string& what) {
  for (float v : x)
    if (!std::isfinite(v))
      throw std::runtime_error("non-finite values in " + what +
                               ": lower the guidance scale, check the model files, or run in float32");
}

Ort::Value float_tensor(std::vector<float>& data, const std::vector<int64_t>& shape) {
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<float>(cpu, data.data(), data.size(), shape.data(), shape.size());
}

Tensor to_tensor(const Ort::Value& value, const std::string& name) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw std::runtime_error("output " + name + " is not float32: the C++ runtime reads float32 exports only");
  Tensor t;
  t.shape = info.GetShape();
  const float* data = value.GetTensorData<float>();
  t.data.assign(data, data + info.GetElementCount());
  return t;
}

std::map<std::string, Tensor> run(Ort::Session& session, std::map<std::string, std::pair<std::vector<float>, std::vector<int64_t>>>& feeds,
                                  const std::vector<std::string>& outputs, double* run_seconds = nullptr) {
  std::vector<const char*> in_names, out_names;
  std::vector<Ort::Value> values;
  for (auto& [name, feed] : feeds) {
    in_names.push_back(name.c_str());
    values.push_back(float_tensor(feed.first, feed.second));
  }
  for (const auto& name : outputs) out_names.push_back(name.c_str());
  const auto start = Clock::now();
  auto results = session.Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(), values.size(), out_names.data(),
                             out_names.size());
  if (run_seconds) *run_seconds += seconds_since(start);
  std::map<std::string, Tensor> out;
  for (size_t i = 0; i < outputs.size(); ++i) out[outputs[i]] = to_tensor(results[i], outputs[i]);
  return out;
}

}  // namespace

Runtime::Runtime(const std::string& export_dir, const RuntimeOptions& options) : export_dir_(export_dir) {
  std::ifstream file(export_dir + "/samg.json");
  if (!file) throw std::runtime_error(export_dir + " is not a samg export (no samg.json): run `samg export` first");
  manifest_ = Json::parse(file);
  if (manifest_.value("format", "") != "samg-export" || manifest_.value("format_version", 0) != 1)
    throw std::runtime_error(export_dir + "/samg.json is not a samg export manifest of format_version 1: re-export");
  for (const auto& name : manifest_["text_encoder"]["outputs"]) conditioning_names_.push_back(name.get<std::string>());

  env_ = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "samg");
  Ort::SessionOptions session_options;
  // As samg's Python runner: idle ORT threads spin by default, stealing a shared CPU from the rest.
  session_options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  if (options.intra_op_threads > 0) session_options.SetIntraOpNumThreads(options.intra_op_threads);
  if (!options.custom_op_library.empty()) session_options.RegisterCustomOpsLibrary(options.custom_op_library.c_str());
  const std::string denoiser = export_dir + "/" + manifest_["denoiser"]["file"].get<std::string>();
  const std::string vae = export_dir + "/" + manifest_["vae"]["file"].get<std::string>();
  denoiser_ = std::make_unique<Ort::Session>(*env_, denoiser.c_str(), session_options);
  vae_ = std::make_unique<Ort::Session>(*env_, vae.c_str(), session_options);
}

Runtime::~Runtime() = default;

Tensor Runtime::denoise(const Tensor& x, double sigma, double timestep, const std::map<std::string, Tensor>& cond,
                        const Request& request) {
  const std::string prediction = manifest_["prediction_type"];
  const bool fused = manifest_["guidance"] == "fused";
  const int64_t batch = x.shape[0];
  const double w_lo = request.guidance == "cfg" ? request.w_max : request.w_min, w_hi = request.w_max;

  std::map<std::string, std::pair<std::vector<float>, std::vector<int64_t>>> feeds;
  const double input_scale = prediction == "flow" ? 1.0 : 1.0 / std::sqrt(1.0 + sigma * sigma);
  feeds["latents"] = {scaled(x.data, input_scale), x.shape};
  feeds["timestep"] = {std::vector<float>(static_cast<size_t>(batch), static_cast<float>(timestep)), {batch}};
  for (const auto& [name, tensor] : cond) feeds[name] = {tensor.data, tensor.shape};
  std::vector<float> scales;
  for (int64_t b = 0; b < batch; ++b) scales.insert(scales.end(), {static_cast<float>(w_lo), static_cast<float>(w_hi)});

  Tensor guided;
  std::map<std::string, Tensor> out;
  if (fused) {
    feeds["guidance_scales"] = {scales, {batch, 2}};
    out = run(*denoiser_, feeds, {"guided"}, &timing_.denoiser_run_s);
  } else {
    out = run(*denoiser_, feeds, {"pred_uncond", "pred_cond"}, &timing_.denoiser_run_s);
  }
  timing_.denoiser_calls += 1;
  if (fused) {
    guided = std::move(out["guided"]);
  } else {
    const Tensor& u = out["pred_uncond"];
    guided = u;
    const Json combine = manifest_.value("combine", Json::object());
    samg_combine_params params{combine.value("tau", 1.0f), combine.value("sharpness", 4.0f), combine.value("smooth", 0),
                               combine.value("channel_axis", 1)};
    if (const char* problem = samg_guidance_combine_cpu(u.data.data(), out["pred_cond"].data.data(), scales.data(),
                                                        guided.data.data(), SAMG_DTYPE_FLOAT32, u.shape.data(),
                                                        static_cast<int>(u.shape.size()), &params, 0))
      throw std::runtime_error(std::string("guidance combine: ") + problem);
  }
  // x0 from the guided prediction (samg.runtime.denoiser._x0_from).
  Tensor x0{x.shape, std::vector<float>(x.data.size())};
  const float s = static_cast<float>(sigma);
  if (prediction == "epsilon" || prediction == "flow") {
    for (size_t i = 0; i < x0.data.size(); ++i) x0.data[i] = x.data[i] - s * guided.data[i];
  } else if (prediction == "v_prediction") {
    const double a = 1.0 / (1.0 + sigma * sigma), b = sigma / std::sqrt(1.0 + sigma * sigma);
    for (size_t i = 0; i < x0.data.size(); ++i) x0.data[i] = static_cast<float>(x.data[i] * a - b * guided.data[i]);
  } else {
    throw std::runtime_error("unknown prediction_type '" + prediction + "' in samg.json: re-export the model");
  }
  return x0;
}

Tensor Runtime::sample(const std::map<std::string, Tensor>& conditioning, const Tensor& noise, const Request& request) {
  if (request.guidance != "samg" && request.guidance != "cfg")
    throw std::invalid_argument("guidance '" + request.guidance + "' is not in the C++ runtime: use samg or cfg");
  if (!(request.w_min <= request.w_max)) throw std::invalid_argument("--w-min is above --w-max: swap them");
  const Schedule schedule = make_schedule(manifest_["scheduler"], request.sampler, request.steps, request.karras);
  const int64_t batch = noise.shape.at(0);

  // [2, ...] from `samg encode` -> [2B, ...]: B copies of the negative, then B of the prompt.
  std::map<std::string, Tensor> cond;
  for (const auto& name : conditioning_names_) {
    auto it = conditioning.find(name);
    if (it == conditioning.end()) throw std::invalid_argument("conditioning '" + name + "' missing: pass " + name + ".npy from `samg encode`");
    const Tensor& t = it->second;
    if (t.shape.empty() || (t.shape[0] != 2 && t.shape[0] != 2 * batch))
      throw std::invalid_argument(name + " has shape " + t.shape_text() + ": expected [2, ...] (negative, prompt) or [2B, ...]");
    if (t.shape[0] == 2 * batch) {
      cond[name] = t;
      continue;
    }
    Tensor expanded{t.shape, {}};
    expanded.shape[0] = 2 * batch;
    const size_t row = t.data.size() / 2;
    for (int half = 0; half < 2; ++half)
      for (int64_t b = 0; b < batch; ++b) expanded.data.insert(expanded.data.end(), t.data.begin() + half * row, t.data.begin() + (half + 1) * row);
    cond[name] = std::move(expanded);
  }

  timing_ = Timing{};
  const auto loop_start = Clock::now();
  Tensor x{noise.shape, scaled(noise.data, static_cast<float>(schedule.init_noise_sigma))};
  const size_t n = schedule.sigmas.size() - 1;
  std::vector<float> old_denoised;
  double h_last = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double sigma = schedule.sigmas[i], sigma_next = schedule.sigmas[i + 1];
    const Tensor denoised = denoise(x, sigma, schedule.timesteps[i], cond, request);
    if (request.sampler == "dpmpp_2m") {  // DPM-Solver++ 2M, as samg.runtime.samplers.sample_dpmpp_2m
      if (sigma_next == 0) {
        x.data = denoised.data;
      } else {
        const double h = -std::log(sigma_next) + std::log(sigma);
        const double ratio = sigma_next / sigma, step = std::expm1(-h);
        for (size_t k = 0; k < x.data.size(); ++k) {
          double d = denoised.data[k];
          if (!old_denoised.empty()) {
            const double r = h_last / h;
            d = (1 + 1 / (2 * r)) * denoised.data[k] - (1 / (2 * r)) * old_denoised[k];
          }
          x.data[k] = static_cast<float>(ratio * x.data[k] - step * d);
        }
        h_last = h;
      }
      old_denoised = denoised.data;
    } else {  // Euler; with DDIM's sigmas it is DDIM (eta 0), with flow sigmas flow-matching Euler
      for (size_t k = 0; k < x.data.size(); ++k) {
        const double d = (static_cast<double>(x.data[k]) - denoised.data[k]) / sigma;
        x.data[k] = static_cast<float>(denoised.data[k] + d * sigma_next);
      }
    }
    check_finite(x.data, "latents after step " + std::to_string(i + 1) + "/" + std::to_string(n));
  }
  if (!schedule.flow) {
    const double last = schedule.sigmas.back();
    x.data = scaled(x.data, 1.0 / std::sqrt(1.0 + last * last));
  }
  timing_.loop_s = seconds_since(loop_start);
  return x;
}

std::vector<Image> Runtime::decode(const Tensor& latents) {
  if (manifest_["latent"]["layout"] != "BCHW")
    throw std::invalid_argument("the C++ runtime decodes image (BCHW) exports; decode video latents with `samg`");
  const Json& vae = manifest_["vae"];
  const float scaling = vae.value("scaling_factor", 1.0f);
  const float shift = vae.contains("shift_factor") && !vae["shift_factor"].is_null() ? vae["shift_factor"].get<float>() : 0.0f;
  std::map<std::string, std::pair<std::vector<float>, std::vector<int64_t>>> feeds;
  std::vector<float> z(latents.data.size());
  for (size_t i = 0; i < z.size(); ++i) z[i] = latents.data[i] / scaling + shift;
  feeds["latents"] = {z, latents.shape};
  const Tensor images = run(*vae_, feeds, {"images"})["images"];  // [N, 3, H, W] in [-1, 1]
  check_finite(images.data, "decoded images (VAE decoder output)");
  const int64_t count = images.shape[0], height = images.shape[2], width = images.shape[3];
  std::vector<Image> out;
  for (int64_t n = 0; n < count; ++n) {
    Image image{static_cast<int>(height), static_cast<int>(width), std::vector<uint8_t>(static_cast<size_t>(height * width * 3))};
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t p = 0; p < height * width; ++p) {
        const float v = std::min(std::max(images.data[((n * 3 + ch) * height * width) + p] / 2 + 0.5f, 0.0f), 1.0f) * 255.0f;
        image.rgb[p * 3 + ch] = static_cast<uint8_t>(std::nearbyint(v));
      }
    out.push_back(std::move(image));
  }
  return out;
}

}  // namespace samg

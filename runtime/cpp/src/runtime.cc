#include "samg/runtime.h"

#include <onnxruntime_cxx_api.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <stdexcept>

#include "guidance_combine.h"  // plugins/cpu: the host-side combine for raw exports
#include "samg/verify.h"

namespace samg {
namespace {

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

// A denoiser output must be finite and of a prediction's size (see kMaxPredictionMagnitude).
void check_prediction(const std::vector<float>& x, const std::string& what) {
  check_finite(x, what);
  for (float v : x)
    if (std::fabs(v) > kMaxPredictionMagnitude)
      throw std::runtime_error(what + " reaches " + std::to_string(v) + ", beyond any prediction (limit " +
                               std::to_string(static_cast<int64_t>(kMaxPredictionMagnitude)) +
                               "): lower the guidance scale or check the model files");
}

void check_input_finite(const Tensor& t, const std::string& what) {
  for (float v : t.data)
    if (!std::isfinite(v)) throw ManifestError(what + " holds non-finite values: regenerate it");
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

// The session's input or output names, and each one's dims (-1 where symbolic) and element type.
struct Port {
  std::string name;
  std::vector<int64_t> dims;
  ONNXTensorElementDataType type;
};

std::vector<Port> ports(Ort::Session& session, bool inputs) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<Port> out;
  const size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
  for (size_t i = 0; i < count; ++i) {
    auto name = inputs ? session.GetInputNameAllocated(i, allocator) : session.GetOutputNameAllocated(i, allocator);
    const Ort::TypeInfo type = inputs ? session.GetInputTypeInfo(i) : session.GetOutputTypeInfo(i);
    const auto info = type.GetTensorTypeAndShapeInfo();
    out.push_back({name.get(), info.GetShape(), info.GetElementType()});
  }
  return out;
}

// The denoiser graph must be what the manifest says: its inputs and outputs by name, float32,
// latents with the manifest's channel count. A mismatch is a damaged or hand-edited export.
void check_denoiser(Ort::Session& session, const Manifest& m) {
  std::vector<std::string> want_in = {"latents", "timestep"};
  want_in.insert(want_in.end(), m.conditioning_names.begin(), m.conditioning_names.end());
  if (m.guidance == "fused") want_in.push_back("guidance_scales");
  const std::vector<std::string> want_out =
      m.guidance == "fused" ? std::vector<std::string>{"guided"} : std::vector<std::string>{"pred_uncond", "pred_cond"};
  for (const bool inputs : {true, false}) {
    const auto have = ports(session, inputs);
    const auto& want = inputs ? want_in : want_out;
    std::string have_names;
    for (const auto& p : have) have_names += (have_names.empty() ? "" : ", ") + p.name;
    bool same = have.size() == want.size();
    for (const auto& name : want) {
      bool found = false;
      for (const auto& p : have) found = found || p.name == name;
      same = same && found;
    }
    if (!same) {
      std::string want_names;
      for (const auto& name : want) want_names += (want_names.empty() ? "" : ", ") + name;
      throw ManifestError("samg.json: denoiser.file's graph has " + std::string(inputs ? "inputs " : "outputs ") + have_names +
                          ", a " + m.guidance + " export's denoiser has " + want_names +
                          ": the manifest does not match the model, re-export the model with `samg export`");
    }
    for (const auto& p : have) {
      if (p.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw ManifestError("denoiser " + std::string(inputs ? "input " : "output ") + p.name +
                            " is not float32: the C++ runtime runs float32 exports only, re-export with --dtype float32");
      const size_t axis = m.latent.layout == "BFCHW" ? 2 : 1;
      if ((p.name == "latents" || p.name == "guided" || p.name == "pred_uncond") && p.dims.size() > axis &&
          p.dims[axis] > 0 && p.dims[axis] != m.latent.channels)
        throw ManifestError("samg.json: latent.channels is " + std::to_string(m.latent.channels) + " but the denoiser's " +
                            p.name + " has " + std::to_string(p.dims[axis]) + ": re-export the model with `samg export`");
    }
  }
}

}  // namespace

void check_request(const Manifest& manifest, const Request& request) {
  if (request.guidance != "samg" && request.guidance != "cfg")
    throw std::invalid_argument("guidance '" + request.guidance + "' is not in the C++ runtime: use samg or cfg");
  for (const double w : {request.w_min, request.w_max})
    if (!(w >= 0.0 && w <= kMaxGuidanceScale))  // NaN fails too
      throw std::invalid_argument("guidance scales must be finite numbers from 0 to " +
                                  std::to_string(static_cast<int>(kMaxGuidanceScale)) + ", got " + std::to_string(w) +
                                  ": e.g. --scale 7.5");
  if (request.guidance == "samg" && !(request.w_min <= request.w_max))
    throw std::invalid_argument("w_min (" + std::to_string(request.w_min) + ") is above w_max (" +
                                std::to_string(request.w_max) + "): swap --w-min and --w-max");
  const Schedule schedule = make_schedule(manifest.scheduler, request.sampler, request.steps, request.karras);
  if (std::isinf(schedule.sigmas[0]) && manifest.prediction_type != "v_prediction")
    throw ManifestError("this schedule starts at zero SNR (infinite sigma), where a " + manifest.prediction_type +
                        " model cannot predict x0: use a v_prediction model or a schedule without rescale_betas_zero_snr");
}

Runtime::Runtime(const std::string& export_dir, const RuntimeOptions& options)
    : export_dir_(export_dir), manifest_(read_manifest(export_dir)) {
  verify_loaded_files(manifest_, export_dir);  // what ONNX Runtime is about to load is what was exported
  env_ = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "samg");
  Ort::SessionOptions session_options;
  // As samg's Python runner: idle ORT threads spin by default, stealing a shared CPU from the rest.
  session_options.AddConfigEntry("session.intra_op.allow_spinning", "0");
  if (options.intra_op_threads > 0) session_options.SetIntraOpNumThreads(options.intra_op_threads);
  if (!options.custom_op_library.empty()) session_options.RegisterCustomOpsLibrary(options.custom_op_library.c_str());
  denoiser_ = std::make_unique<Ort::Session>(*env_, manifest_.denoiser_path.c_str(), session_options);
  vae_ = std::make_unique<Ort::Session>(*env_, manifest_.vae_path.c_str(), session_options);
  check_denoiser(*denoiser_, manifest_);
}

Runtime::~Runtime() = default;

Tensor Runtime::denoise(const Tensor& x, double sigma, double timestep, const std::map<std::string, Tensor>& cond,
                        const Request& request) {
  const std::string& prediction = manifest_.prediction_type;
  const bool fused = manifest_.guidance == "fused";
  const int64_t batch = x.shape[0];
  const double w_lo = request.guidance == "cfg" ? request.w_max : request.w_min, w_hi = request.w_max;

  std::map<std::string, std::pair<std::vector<float>, std::vector<int64_t>>> feeds;
  // At sigma = inf (zero terminal SNR) the sampler variable already holds the model latents.
  const bool zero_snr = std::isinf(sigma);
  const double input_scale = prediction == "flow" || zero_snr ? 1.0 : 1.0 / std::sqrt(1.0 + sigma * sigma);
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
    const CombineSpec& combine = manifest_.combine;
    samg_combine_params params{combine.tau, combine.sharpness, combine.smooth, combine.channel_axis};
    if (const char* problem = samg_guidance_combine_cpu(u.data.data(), out["pred_cond"].data.data(), scales.data(),
                                                        guided.data.data(), SAMG_DTYPE_FLOAT32, u.shape.data(),
                                                        static_cast<int>(u.shape.size()), &params, 0))
      throw std::runtime_error(std::string("guidance combine: ") + problem);
  }
  if (guided.shape != x.shape)
    throw std::runtime_error("the denoiser returned " + guided.shape_text() + " for latents " + x.shape_text() +
                             ": check the model files or re-export the model");
  check_prediction(guided.data, "the denoiser's guided prediction");
  // x0 from the guided prediction (samg.runtime.denoiser._x0_from).
  Tensor x0{x.shape, std::vector<float>(x.data.size())};
  const float s = static_cast<float>(sigma);
  if (zero_snr) {  // alpha_bar = 0: x0 = sqrt(ab) x_t - sqrt(1 - ab) v = -v, as diffusers' DDIM (check_request
                   // admits only v_prediction here)
    for (size_t i = 0; i < x0.data.size(); ++i) x0.data[i] = -guided.data[i];
  } else if (prediction == "epsilon" || prediction == "flow") {
    for (size_t i = 0; i < x0.data.size(); ++i) x0.data[i] = x.data[i] - s * guided.data[i];
  } else if (prediction == "v_prediction") {
    const double a = 1.0 / (1.0 + sigma * sigma), b = sigma / std::sqrt(1.0 + sigma * sigma);
    for (size_t i = 0; i < x0.data.size(); ++i) x0.data[i] = static_cast<float>(x.data[i] * a - b * guided.data[i]);
  } else {  // read_manifest admits no other
    throw std::logic_error("prediction_type " + prediction);
  }
  return x0;
}

Tensor Runtime::sample(const std::map<std::string, Tensor>& conditioning, const Tensor& noise, const Request& request) {
  check_request(manifest_, request);
  const Schedule schedule = make_schedule(manifest_.scheduler, request.sampler, request.steps, request.karras);
  const LatentSpec& latent = manifest_.latent;
  const size_t rank = latent.layout == "BCHW" ? 4 : 5;
  const size_t channel_axis = latent.layout == "BFCHW" ? 2 : 1;
  if (noise.shape.size() != rank || noise.shape[channel_axis] != latent.channels || noise.size() < 1 ||
      noise.size() > kMaxLatentElements)
    throw std::invalid_argument("noise has shape " + noise.shape_text() + ": this " + latent.layout + " export needs " +
                                std::to_string(rank) + "-D latents with " + std::to_string(latent.channels) +
                                " channels on axis " + std::to_string(channel_axis));
  check_input_finite(noise, "the noise");
  const int64_t batch = noise.shape[0];

  // [2, ...] from `samg encode` -> [2B, ...]: B copies of the negative, then B of the prompt.
  std::map<std::string, Tensor> cond;
  for (const auto& name : manifest_.conditioning_names) {
    auto it = conditioning.find(name);
    if (it == conditioning.end()) throw std::invalid_argument("conditioning '" + name + "' missing: pass " + name + ".npy from `samg encode`");
    const Tensor& t = it->second;
    if (t.shape.empty() || (t.shape[0] != 2 && t.shape[0] != 2 * batch) || t.size() < 2)
      throw std::invalid_argument(name + " has shape " + t.shape_text() + ": expected [2, ...] (negative, prompt) or [2B, ...]");
    if (t.size() / t.shape[0] * 2 * batch > kMaxTensorElements)
      throw std::invalid_argument(name + " repeated for " + std::to_string(batch) + " samples would hold over " +
                                  std::to_string(kMaxTensorElements) + " values: lower the batch");
    check_input_finite(t, "conditioning " + name);
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
        // At sigma = inf: x holds x_VE / sigma, h = inf, expm1(-h) = -1, and the next step's r = inf
        // gives d = denoised (1 / (2 r) = 0).
        const double h = -std::log(sigma_next) + std::log(sigma);
        const double ratio = std::isinf(sigma) ? sigma_next : sigma_next / sigma, step = std::expm1(-h);
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
      const bool zero_snr = std::isinf(sigma);
      for (size_t k = 0; k < x.data.size(); ++k) {
        // (x - x0) / sigma; at sigma = inf the variable holds x / sigma and x0 / sigma is 0
        const double d = zero_snr ? x.data[k] : (static_cast<double>(x.data[k]) - denoised.data[k]) / sigma;
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
  if (manifest_.latent.layout != "BCHW")
    throw std::invalid_argument("the C++ runtime decodes image (BCHW) exports; decode video latents with `samg`");
  const float scaling = static_cast<float>(manifest_.vae_scaling_factor);
  const float shift = static_cast<float>(manifest_.vae_shift_factor);
  std::map<std::string, std::pair<std::vector<float>, std::vector<int64_t>>> feeds;
  std::vector<float> z(latents.data.size());
  for (size_t i = 0; i < z.size(); ++i) z[i] = latents.data[i] / scaling + shift;
  feeds["latents"] = {z, latents.shape};
  const Tensor images = run(*vae_, feeds, {"images"})["images"];  // [N, 3, H, W] in [-1, 1]
  if (images.shape.size() != 4 || images.shape[0] != latents.shape.at(0) || images.shape[1] != 3)
    throw std::runtime_error("the VAE decoder returned " + images.shape_text() + ", not [N, 3, H, W] images: re-export the model");
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

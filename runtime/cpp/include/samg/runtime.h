// samg's C++ runtime over the ONNX Runtime C++ API: reads an export folder's samg.json, runs the
// guided denoiser through a sampling loop and decodes with the VAE. Mirrors samg.runtime (Python):
// same schedules, samplers and x0 conversions, so both give the same latents for the same inputs.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "samg/manifest.h"
#include "samg/npy.h"
#include "samg/schedules.h"

namespace Ort {
struct Env;
struct Session;
}  // namespace Ort

namespace samg {

struct RuntimeOptions {
  int intra_op_threads = 0;         // 0: ONNX Runtime's default
  std::string custom_op_library;    // libsamg_ort.so to register ("" = none)
};

struct Request {
  std::string guidance = "samg";    // "samg" (w_min..w_max) or "cfg" (one scale)
  double w_min = 4.25, w_max = 7.5; // in [0, kMaxGuidanceScale], w_min <= w_max; cfg uses w_max
  std::string sampler = "euler";    // euler, ddim, dpmpp_2m, flow_euler
  int steps = 30;
  bool karras = false;
};

// std::invalid_argument (one line) unless `request` can run on this export: guidance samg|cfg,
// scales finite in [0, kMaxGuidanceScale] with w_min <= w_max, a sampler that fits the scheduler,
// 1 <= steps <= num_train_timesteps. Cheap: call it before loading sessions or allocating.
void check_request(const Manifest& manifest, const Request& request);

// Wall-clock time of the last sample() call: the whole loop, and the part spent inside the
// denoiser session's Run (so loop_s - denoiser_run_s is the runtime's own per-step overhead).
struct Timing {
  double loop_s = 0.0;
  double denoiser_run_s = 0.0;
  int denoiser_calls = 0;
};

struct Image {  // uint8 RGB, row-major
  int height = 0, width = 0;
  std::vector<uint8_t> rgb;
};

class Runtime {
 public:
  // Reads and validates samg.json, checks the graphs against its `files` hashes (samg/verify.h) and
  // loads them; ManifestError (std::invalid_argument, one line) for a bad manifest or a changed file.
  Runtime(const std::string& export_dir, const RuntimeOptions& options);
  ~Runtime();

  // The validated manifest (`.raw`: the whole samg.json document).
  const Manifest& manifest() const { return manifest_; }
  // Names of the denoiser's conditioning inputs (files `<name>.npy` from `samg encode`).
  const std::vector<std::string>& conditioning_names() const { return manifest_.conditioning_names; }

  // `conditioning`: per name, [2, ...] (negative first, then the prompt) or already [2B, ...].
  // `noise`: standard normal latents [B, ...] (e.g. samg::standard_normal(seed, shape)).
  // Returns the final latents in the model's space. Throws ManifestError (std::invalid_argument)
  // for bad requests or inputs, std::runtime_error when the model's outputs go non-finite or
  // beyond kMaxPredictionMagnitude.
  Tensor sample(const std::map<std::string, Tensor>& conditioning, const Tensor& noise, const Request& request);
  // Images from model-space latents (image models: [N, C, h, w]).
  std::vector<Image> decode(const Tensor& latents);
  // Timing of the last sample() call.
  const Timing& last_timing() const { return timing_; }

 private:
  Tensor denoise(const Tensor& x, double sigma, double timestep, const std::map<std::string, Tensor>& cond,
                 const Request& request);

  std::string export_dir_;
  Manifest manifest_;
  std::unique_ptr<Ort::Env> env_;
  std::unique_ptr<Ort::Session> denoiser_, vae_;
  Timing timing_;
};

// Throws std::runtime_error on failure.
void write_ppm(const std::string& path, const Image& image);
void write_png(const std::string& path, const Image& image);

}  // namespace samg

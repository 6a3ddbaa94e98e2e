// An export folder's samg.json, read and validated once: every field the C++ runtime uses is
// checked here (type, range, allowed values; paths confined to the export folder), so the rest of
// the runtime works on plain checked values. A bad field is one ManifestError line naming it:
//   samg.json: latent.spatial_factor must be a positive integer, got 0: re-export the model
// The Python runtime checks the same fields in samg/contract.py.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "samg/limits.h"

namespace samg {

// Bad input (manifest, arguments): samg-run exits 2 on it.
struct ManifestError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct SchedulerSpec {
  std::string kind;                 // "discrete" or "flow"
  int num_train_timesteps = 1000;
  double beta_start = 0.0001, beta_end = 0.02;
  std::string beta_schedule = "linear";  // linear, scaled_linear, squaredcos_cap_v2
  std::string timestep_spacing;     // leading, trailing, linspace; "" = the sampler's default
  int steps_offset = 0;
  bool rescale_betas_zero_snr = false;
  bool set_alpha_to_one = true;
  double shift = 1.0;               // flow
  // CogVideoXDDIMScheduler's alphas_cumprod shift (0: none); with rescale_betas_zero_snr the
  // schedule ends at alpha_bar = 0, an infinite first sigma (samg.runtime.schedules).
  double snr_shift_scale = 0.0;
};

struct CombineSpec {
  float tau = 1.0f, sharpness = 4.0f;
  int smooth = 0, channel_axis = 1;
};

struct LatentSpec {
  std::string layout;               // BCHW, BCFHW, BFCHW
  int64_t channels = 0, spatial_factor = 0, temporal_factor = 1;
  int64_t height = 0, width = 0;    // pixels
  int64_t frames = 0;               // pixel frames (video), 0 for images
  int64_t size_multiple = 0;        // pixel sizes must be multiples of this
  bool dynamic_resolution = false, dynamic_frames = false;
};

struct Manifest {
  std::string prediction_type;      // epsilon, v_prediction, flow
  std::string guidance;             // fused or raw
  CombineSpec combine;
  LatentSpec latent;
  SchedulerSpec scheduler;
  std::string denoiser_path, vae_path;  // inside the export folder, existing regular files
  std::string denoiser_file, vae_file;  // the same, relative to the export folder (as in samg.json)
  std::map<std::string, std::string> file_hashes;  // `files`: name -> "sha256:<64 hex digits>"
  double vae_scaling_factor = 1.0, vae_shift_factor = 0.0;
  std::vector<std::string> conditioning_names;  // denoiser conditioning inputs (<name>.npy)
  nlohmann::json raw;               // the whole document, as read
};

// Reads and validates EXPORT_DIR/samg.json; throws ManifestError (one line) on any problem.
Manifest read_manifest(const std::string& export_dir);

// The `scheduler` section alone, validated as read_manifest does (tools/schedule.cc, tests).
SchedulerSpec read_scheduler_spec(const nlohmann::json& scheduler);

// Latent shape for `batch` samples at a pixel size (frames: 0 for images), after checking it
// against the manifest (multiples, static sizes, kMaxLatentElements); ManifestError otherwise.
std::vector<int64_t> latent_shape(const LatentSpec& latent, int64_t batch, int64_t height, int64_t width,
                                  int64_t frames);

}  // namespace samg

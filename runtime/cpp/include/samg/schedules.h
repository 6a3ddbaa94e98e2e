// Noise schedules: a C++ port of samg/runtime/schedules.py (itself diffusers' timestep/sigma math),
// including its float32 roundings, so that the C++ and Python runtimes take the same steps.
#pragma once

#include <string>
#include <vector>

#include "samg/manifest.h"

namespace samg {

struct Schedule {
  std::vector<double> sigmas;     // steps + 1, decreasing, ends at the final sigma
  std::vector<double> timesteps;  // steps: the model's own timestep at sigmas[i]
  double init_noise_sigma = 1.0;  // initial sampler variable = standard normal noise * this
  bool flow = false;              // flow matching (sampler variable = model latents)
};

// alpha_bar(t) for t = 0..num_train_timesteps-1 (float32 values as diffusers, or CogVideoX's float64
// shifted recipe when snr_shift_scale is set, ending at exactly 0 with rescale_betas_zero_snr).
// ManifestError when the betas give no usable schedule.
std::vector<double> alphas_cumprod(const SchedulerSpec& scheduler);

// Throws std::invalid_argument with a fix for unknown samplers, or steps outside [1, num_train_timesteps].
Schedule make_schedule(const SchedulerSpec& scheduler, const std::string& sampler, int steps, bool karras);

}  // namespace samg

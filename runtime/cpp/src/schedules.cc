#include "samg/schedules.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace samg {
namespace {

// numpy.linspace: start + i * step in float64, last element exactly `stop`.
std::vector<double> linspace(double start, double stop, int64_t num) {
  std::vector<double> out(static_cast<size_t>(std::max<int64_t>(num, 0)));
  if (num == 1) out[0] = start;
  if (num <= 1) return out;
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) out[i] = static_cast<double>(i) * step + start;
  out[num - 1] = stop;
  return out;
}

// numpy.arange(start, stop, step) for floats: ceil((stop - start) / step) values.
std::vector<double> arange(double start, double stop, double step) {
  const double count = std::ceil((stop - start) / step);
  std::vector<double> out;
  for (int64_t i = 0; i < static_cast<int64_t>(count); ++i) out.push_back(start + static_cast<double>(i) * step);
  return out;
}

double round_half_even(double x) { return std::nearbyint(x); }

std::vector<float> betas(int n, double beta_start, double beta_end, const std::string& kind) {
  std::vector<float> b(static_cast<size_t>(n));
  if (kind == "linear") {
    auto v = linspace(beta_start, beta_end, n);
    for (int i = 0; i < n; ++i) b[i] = static_cast<float>(v[i]);
  } else if (kind == "scaled_linear") {
    auto v = linspace(std::sqrt(beta_start), std::sqrt(beta_end), n);
    for (int i = 0; i < n; ++i) {
      const float root = static_cast<float>(v[i]);
      b[i] = root * root;
    }
  } else if (kind == "squaredcos_cap_v2") {
    auto alpha_bar = [n](int i) {
      const double t = static_cast<double>(i) / n;
      const double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
      return c * c;
    };
    for (int i = 0; i < n; ++i) b[i] = static_cast<float>(std::min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999));
  } else {
    throw std::invalid_argument("unknown beta_schedule '" + kind +
                                "' in samg.json: use linear, scaled_linear or squaredcos_cap_v2");
  }
  return b;
}

// CogVideoXDDIMScheduler's alpha_bar (samg.runtime.schedules.shifted_alphas_cumprod): cumprod of
// 1 - betas, shifted by snr_shift_scale as SD3, `ac / (s + (1 - s) ac)`, then (if asked) rescaled to
// zero terminal SNR on alphas_cumprod itself, which ends at exactly 0. T is the betas' precision:
// float64 for scaled_linear (as diffusers' CogVideoX scheduler), float32 otherwise.
template <typename T>
std::vector<double> shifted_alphas_cumprod(const SchedulerSpec& cfg, const std::vector<T>& b) {
  const size_t n = b.size();
  std::vector<T> ac(n);
  T running = 1;
  for (size_t i = 0; i < n; ++i) ac[i] = running *= (T(1) - b[i]);
  const T shift = static_cast<T>(cfg.snr_shift_scale), one_minus_shift = static_cast<T>(1 - cfg.snr_shift_scale);
  for (size_t i = 0; i < n; ++i) ac[i] = ac[i] / (shift + one_minus_shift * ac[i]);
  if (cfg.rescale_betas_zero_snr) {  // diffusers' version on alphas_cumprod, no clamp
    std::vector<T> root(n);
    for (size_t i = 0; i < n; ++i) root[i] = std::sqrt(ac[i]);
    const T first = root[0], last = root[n - 1], gain = first / (first - last);
    for (size_t i = 0; i < n; ++i) {
      const T s = (root[i] - last) * gain;
      ac[i] = s * s;
    }
  }
  return std::vector<double>(ac.begin(), ac.end());
}

}  // namespace

// alpha_bar(t), t = 0..T-1, with the precision of samg/runtime/schedules.py (float32 values, except
// CogVideoX's float64 recipe). Zero terminal SNR through snr_shift_scale ends at exactly 0 (first
// sigma infinite); otherwise every value is in (0, 1).
std::vector<double> alphas_cumprod(const SchedulerSpec& cfg) {
  const size_t n = static_cast<size_t>(cfg.num_train_timesteps);
  std::vector<double> out;
  if (cfg.snr_shift_scale > 0) {
    if (cfg.beta_schedule == "scaled_linear") {
      std::vector<double> b(n);
      const auto roots = linspace(std::sqrt(cfg.beta_start), std::sqrt(cfg.beta_end), static_cast<int64_t>(n));
      for (size_t i = 0; i < n; ++i) b[i] = roots[i] * roots[i];
      out = shifted_alphas_cumprod(cfg, b);
    } else {
      out = shifted_alphas_cumprod(cfg, betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule));
    }
  } else {
    std::vector<float> b = betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule);
    const bool zero_snr = cfg.rescale_betas_zero_snr;
    if (zero_snr) {  // Lin et al. 2023, Algorithm 1, in float32 like the numpy port
      std::vector<float> sqrt_ab(n);
      float running = 1.0f;
      for (size_t i = 0; i < n; ++i) sqrt_ab[i] = std::sqrt(running *= (1.0f - b[i]));
      const float first = sqrt_ab[0], last = sqrt_ab[n - 1];
      std::vector<float> ab(n);
      for (size_t i = 0; i < n; ++i) {
        const float s = (sqrt_ab[i] - last) * first / (first - last);
        ab[i] = s * s;
      }
      for (size_t i = 0; i < n; ++i) b[i] = 1.0f - (i == 0 ? ab[0] : ab[i] / ab[i - 1]);
    }
    std::vector<float> ac(n);
    float running = 1.0f;
    for (size_t i = 0; i < n; ++i) ac[i] = running *= (1.0f - b[i]);
    if (zero_snr) ac[n - 1] = std::ldexp(1.0f, -24);  // as diffusers: near zero, so the first sigma is finite
    out.assign(ac.begin(), ac.end());
  }
  // Betas that round away leave alphas_cumprod at 1 (sigma 0) or flat: no schedule. Only the
  // shifted zero-SNR recipe may end at exactly 0.
  const bool may_end_at_zero = cfg.snr_shift_scale > 0 && cfg.rescale_betas_zero_snr;
  for (size_t i = 0; i < n; ++i) {
    const bool at_zero_end = may_end_at_zero && i == n - 1 && out[i] == 0.0;
    if (!((out[i] > 0.0 || at_zero_end) && out[i] < 1.0) || (i && !(out[i] < out[i - 1])))
      throw ManifestError("samg.json: scheduler betas give no usable noise schedule (alphas_cumprod[" + std::to_string(i) +
                          "] = " + std::to_string(out[i]) + "): re-export the model with `samg export`");
  }
  return out;
}

namespace {

// sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) in float64; inf where alpha_bar is 0.
double sigma_of(double ac) { return std::sqrt((1.0 - ac) / ac); }

std::vector<double> train_sigmas(const std::vector<double>& ac) {
  std::vector<double> out(ac.size());
  for (size_t i = 0; i < ac.size(); ++i) out[i] = sigma_of(ac[i]);
  return out;
}

// The first sigma of a schedule that starts at zero SNR is infinite: the sampler variable then
// holds the model latents themselves (standard normal noise), so the starting scale is 1.
double init_noise_scale(double first_sigma, double finite_scale) { return std::isinf(first_sigma) ? 1.0 : finite_scale; }

void refuse_karras_at_zero_snr(const std::vector<double>& full) {
  for (double s : full)
    if (std::isinf(s))
      throw std::invalid_argument("--karras spaces sigmas between the smallest and the largest, and this schedule's largest "
                                  "is infinite (zero terminal SNR): drop --karras");
}

// numpy.interp(x, arange(len(fp)), fp).
double interp_index(double x, const std::vector<double>& fp) {
  const int64_t last = static_cast<int64_t>(fp.size()) - 1;
  if (x <= 0) return fp[0];
  if (x >= static_cast<double>(last)) return fp[last];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];  // as numpy: no slope at a sample point (fp may be inf)
  const double slope = (fp[j + 1] - fp[j]) / 1.0;
  const double y = slope * (x - static_cast<double>(j)) + fp[j];
  if (!std::isnan(y)) return y;
  const double other = slope * (x - static_cast<double>(j + 1)) + fp[j + 1];  // numpy's other direction
  return std::isnan(other) && fp[j] == fp[j + 1] ? fp[j] : other;
}

double sigma_to_t(double sigma, const std::vector<double>& log_sigmas) {
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  // argmax of the cumulative count of (log_sigma >= log_sigmas[i]): the last index where it holds
  int64_t low = 0, count = 0, best = -1;
  for (int64_t i = 0; i < n; ++i) {
    count += (log_sigma - log_sigmas[i]) >= 0;
    if (count > best) best = count, low = i;
  }
  low = std::min(low, n - 2);
  double w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]);
  w = std::clamp(w, 0.0, 1.0);
  return (1 - w) * static_cast<double>(low) + w * static_cast<double>(low + 1);
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int n, double rho = 7.0) {
  const auto ramp = linspace(0, 1, n);
  const double lo = std::pow(sigma_min, 1 / rho), hi = std::pow(sigma_max, 1 / rho);
  std::vector<double> out(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out[i] = std::pow(hi + ramp[i] * (lo - hi), rho);
  return out;
}

std::vector<double> spaced_timesteps(const std::string& spacing, int steps, int num_train, int steps_offset) {
  std::vector<double> ts;
  if (spacing == "linspace") {
    ts = linspace(0, num_train - 1, steps);
    std::reverse(ts.begin(), ts.end());
  } else if (spacing == "leading") {
    const int ratio = num_train / steps;
    for (int i = steps - 1; i >= 0; --i) ts.push_back(round_half_even(static_cast<double>(i) * ratio) + steps_offset);
  } else if (spacing == "trailing") {
    for (double t : arange(num_train, 0, -static_cast<double>(num_train) / steps)) ts.push_back(round_half_even(t) - 1.0);
  } else {
    throw std::invalid_argument("unknown timestep_spacing '" + spacing + "' in samg.json: use leading, trailing or linspace");
  }
  return ts;
}

Schedule euler_schedule(const SchedulerSpec& cfg, int steps, bool karras) {
  const auto ac = alphas_cumprod(cfg);
  const int num_train = static_cast<int>(ac.size());
  const std::string spacing = cfg.timestep_spacing.empty() ? "leading" : cfg.timestep_spacing;
  std::vector<double> ts = spaced_timesteps(spacing, steps, num_train, cfg.steps_offset);
  const auto full = train_sigmas(ac);
  std::vector<double> sig(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) sig[i] = interp_index(ts[i], full);
  if (karras) {
    refuse_karras_at_zero_snr(full);
    std::vector<double> log_full(full.size());
    for (size_t i = 0; i < full.size(); ++i) log_full[i] = std::log(full[i]);
    sig = karras_sigmas(sig.back(), sig.front(), steps);
    for (size_t i = 0; i < sig.size(); ++i) ts[i] = sigma_to_t(sig[i], log_full);
  }
  Schedule s;
  s.timesteps = ts;
  s.sigmas = sig;
  s.sigmas.push_back(0.0);
  const double max_sigma = *std::max_element(s.sigmas.begin(), s.sigmas.end());
  // diffusers' quirk: the starting noise is scaled by sqrt(sigma^2 + 1) for "leading" spacing
  s.init_noise_sigma = init_noise_scale(max_sigma, (spacing == "linspace" || spacing == "trailing")
                                                       ? max_sigma
                                                       : std::sqrt(max_sigma * max_sigma + 1));
  return s;
}

Schedule ddim_schedule(const SchedulerSpec& cfg, int steps) {
  const auto ac = alphas_cumprod(cfg);
  const int num_train = static_cast<int>(ac.size());
  const std::string spacing = cfg.timestep_spacing.empty() ? "leading" : cfg.timestep_spacing;
  std::vector<double> ts = spaced_timesteps(spacing, steps, num_train, cfg.steps_offset);
  const double final_ac = cfg.set_alpha_to_one ? 1.0 : ac[0];
  Schedule s;
  double last_prev_ac = final_ac;
  int64_t expected_t = 0;  // the previous step's "previous timestep" (none before the first step)
  bool first = true;
  for (double t : ts) {
    const int64_t step_t = static_cast<int64_t>(spacing == "linspace" ? round_half_even(t) : t);
    if (step_t < 0 || step_t >= num_train)  // leading spacing + steps_offset at steps == num_train_timesteps
      throw std::invalid_argument("ddim with " + std::to_string(steps) + " steps reaches timestep " + std::to_string(step_t) +
                                  ", beyond the model's " + std::to_string(num_train) + ": use fewer --steps");
    // DDIM steps from t to prev; diffusers evaluates the next step at its own t even where that is
    // not prev (a timestep the step did not land on). samg does not copy that (as the Python runtime).
    if (!first && step_t != expected_t)
      throw std::invalid_argument("DDIM with " + spacing + " spacing at " + std::to_string(steps) +
                                  " steps evaluates the model at timesteps its steps do not land on: use a step count "
                                  "that divides " + std::to_string(num_train) + " (e.g. 50) or --sampler euler");
    const int64_t prev = step_t - num_train / steps;
    expected_t = prev, first = false;
    s.timesteps.push_back(static_cast<double>(step_t));
    s.sigmas.push_back(sigma_of(ac[step_t]));
    last_prev_ac = prev >= 0 ? ac[prev] : final_ac;
  }
  s.sigmas.push_back(sigma_of(last_prev_ac));
  s.init_noise_sigma = init_noise_scale(s.sigmas[0], std::sqrt(1 + s.sigmas[0] * s.sigmas[0]));
  return s;
}

Schedule dpm_schedule(const SchedulerSpec& cfg, int steps, bool karras) {
  const auto ac = alphas_cumprod(cfg);
  const int num_train = static_cast<int>(ac.size());
  const std::string spacing = cfg.timestep_spacing.empty() ? "linspace" : cfg.timestep_spacing;
  std::vector<double> ts;
  if (spacing == "linspace") {
    auto v = linspace(0, num_train - 1, steps + 1);
    for (int i = steps; i >= 1; --i) ts.push_back(round_half_even(v[i]));
  } else if (spacing == "leading") {
    const int ratio = num_train / (steps + 1);
    for (int i = steps; i >= 1; --i) ts.push_back(round_half_even(static_cast<double>(i) * ratio) + cfg.steps_offset);
  } else if (spacing == "trailing") {
    for (double t : arange(num_train, 0, -static_cast<double>(num_train) / steps)) ts.push_back(round_half_even(t) - 1);
  } else {
    throw std::invalid_argument("unknown timestep_spacing '" + spacing + "' in samg.json: use leading, trailing or linspace");
  }
  const auto full = train_sigmas(ac);
  std::vector<double> sig;
  if (karras) {
    refuse_karras_at_zero_snr(full);
    std::vector<double> log_full(full.size());
    for (size_t i = 0; i < full.size(); ++i) log_full[i] = std::log(full[i]);
    sig = karras_sigmas(full.front(), full.back(), steps);
    ts.resize(sig.size());
    for (size_t i = 0; i < sig.size(); ++i) ts[i] = round_half_even(sigma_to_t(sig[i], log_full));
  } else {
    for (double t : ts) sig.push_back(interp_index(t, full));
  }
  Schedule s;
  s.timesteps = ts;
  s.sigmas = sig;
  s.sigmas.push_back(0.0);
  s.init_noise_sigma = init_noise_scale(s.sigmas[0], std::sqrt(1 + s.sigmas[0] * s.sigmas[0]));
  return s;
}

double shift_sigma(double s, double shift) { return shift * s / (1 + (shift - 1) * s); }

Schedule flow_schedule(const SchedulerSpec& cfg, int steps) {
  const int num_train = cfg.num_train_timesteps;
  const double shift = cfg.shift;
  const double sigma_max = shift_sigma(1.0, shift), sigma_min = shift_sigma(1.0 / num_train, shift);
  Schedule s;
  s.flow = true;
  for (double t : linspace(sigma_max * num_train, sigma_min * num_train, steps)) {
    const double sigma = shift_sigma(t / num_train, shift);
    s.sigmas.push_back(sigma);
    s.timesteps.push_back(sigma * num_train);
  }
  s.sigmas.push_back(0.0);
  s.init_noise_sigma = 1.0;
  return s;
}

}  // namespace

Schedule make_schedule(const SchedulerSpec& cfg, const std::string& sampler, int steps, bool karras) {
  // As diffusers: more steps than training timesteps would repeat or skip past them.
  if (steps < 1 || steps > cfg.num_train_timesteps)
    throw std::invalid_argument("steps must be from 1 to the model's num_train_timesteps (" +
                                std::to_string(cfg.num_train_timesteps) + "), got " + std::to_string(steps) +
                                ": e.g. --steps 30");
  const std::string& kind = cfg.kind;
  if (kind == "flow") {
    if (sampler != "flow_euler" && sampler != "euler")
      throw std::invalid_argument("sampler '" + sampler + "' does not apply to a flow-matching model: use --sampler flow_euler");
    return flow_schedule(cfg, steps);
  }
  if (kind != "discrete") throw std::invalid_argument("unknown scheduler kind '" + kind + "' in samg.json: re-export the model");
  if (sampler == "ddim") {
    if (karras) throw std::invalid_argument("--karras does not apply to ddim: use --sampler euler or dpmpp_2m");
    return ddim_schedule(cfg, steps);
  }
  if (sampler == "dpmpp_2m") return dpm_schedule(cfg, steps, karras);
  if (sampler == "euler") return euler_schedule(cfg, steps, karras);
  if (sampler == "flow_euler") throw std::invalid_argument("flow_euler needs a flow-matching model: use --sampler euler, ddim or dpmpp_2m");
  throw std::invalid_argument("unknown sampler '" + sampler + "': use euler, ddim, dpmpp_2m or flow_euler");
}

}  // namespace samg

// samg-schedule SCHEDULER.json SAMPLER STEPS [--karras]: the C++ runtime's noise schedule for a
// samg.json `scheduler` section, as one JSON line on stdout (alphas_cumprod, sigmas, timesteps,
// init_noise_sigma; an infinite sigma is written Infinity, as Python's json does), for comparing
// it with diffusers' schedulers (tests/test_native_cpp_schedules.py). Bad input: one line, exit 2.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "samg/schedules.h"

namespace {

std::string number(double x) {
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (std::isnan(x)) return "NaN";
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", x);  // round-trips a double exactly
  return text;
}

std::string list(const std::vector<double>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + number(values[i]);
  return out + "]";
}

}  // namespace

int main(int argc, char** argv) {
  const bool karras = argc == 5 && std::string(argv[4]) == "--karras";
  if (argc != 4 && !karras) {
    std::cerr << "usage: samg-schedule SCHEDULER.json SAMPLER STEPS [--karras]\n";
    return 2;
  }
  try {
    std::ifstream file(argv[1]);
    if (!file) throw samg::ManifestError(std::string("cannot read ") + argv[1]);
    std::stringstream text;
    text << file.rdbuf();
    const auto parsed = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions*/ false);
    if (parsed.is_discarded()) throw samg::ManifestError(std::string(argv[1]) + " is not valid JSON");
    const samg::SchedulerSpec spec = samg::read_scheduler_spec(parsed);
    const int steps = std::atoi(argv[3]);
    const samg::Schedule schedule = samg::make_schedule(spec, argv[2], steps, karras);
    std::vector<double> ac;
    if (spec.kind == "discrete") ac = samg::alphas_cumprod(spec);
    std::cout << "{\"alphas_cumprod\": " << list(ac) << ", \"sigmas\": " << list(schedule.sigmas)
              << ", \"timesteps\": " << list(schedule.timesteps) << ", \"init_noise_sigma\": "
              << number(schedule.init_noise_sigma) << "}\n";
    return 0;
  } catch (const std::invalid_argument& error) {
    std::cerr << "samg-schedule: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "samg-schedule: " << error.what() << "\n";
    return 1;
  }
}

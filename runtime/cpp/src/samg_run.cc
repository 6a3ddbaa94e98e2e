// samg-run: sample an export folder from the command line with the C++ runtime.
//
//   samg-run EXPORT_DIR --cond DIR (--seed N [--num-images N] [--height H --width W] [--frames F] | --noise noise.npy)
//            [--guidance samg|cfg] [--scale W | --w-min A --w-max B]
//            [--sampler euler|ddim|dpmpp_2m|flow_euler] [--steps N] [--karras] [--threads N]
//            [--custom-op-library PATH|none] [--out-latents out.npy] [--out-image out.png|out.ppm]
//            [--timing] [--repeat N]
//
// --cond DIR holds one <name>.npy per conditioning input, written by `samg encode`. The initial
// noise is either drawn from --seed with samg's Philox generator (the same noise as
// `samg generate --seed N` at the same size and image count) or read from --noise, a standard
// normal .npy [B, *latent]. --timing prints one JSON line on stdout: session load time and, per
// sampling loop, the loop's wall time and the time inside the denoiser session's Run calls.
// --repeat N runs the loop N times in this process (the outputs are the last run's), so later
// runs show warm-session timings. Bad input: one line on stderr, exit 2; other failures exit 1.
#include <cerrno>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <limits>
#include <string>

#include "samg/rng.h"
#include "samg/runtime.h"

namespace {

constexpr const char* kUsage =
    "usage: samg-run EXPORT_DIR --cond DIR (--seed N [--num-images N] [--height H --width W] [--frames F] | --noise noise.npy)\n"
    "                [--guidance samg|cfg] [--scale W | --w-min A --w-max B]\n"
    "                [--sampler euler|ddim|dpmpp_2m|flow_euler] [--steps N] [--karras] [--threads N]\n"
    "                [--custom-op-library PATH|none] [--out-latents out.npy] [--out-image out.png|out.ppm]\n"
    "                [--timing] [--repeat N]\n";
constexpr double kDefaultScale = 7.5;  // as `samg generate`
constexpr int kMaxRepeat = 1000;
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxImages = 64;

using samg::ManifestError;  // bad input: exit 2

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || *end != '\0') throw ManifestError(flag + " needs a number, got '" + text + "'");
  return value;
}

// A guidance scale: finite, in [0, kMaxGuidanceScale].
double parse_scale(const std::string& flag, const std::string& text) {
  const double value = parse_number(flag, text);
  if (!(value >= 0.0 && value <= samg::kMaxGuidanceScale))  // NaN fails too
    throw ManifestError(flag + " must be a finite number from 0 to " +
                        std::to_string(static_cast<int>(samg::kMaxGuidanceScale)) + ", got '" + text + "': e.g. " +
                        flag + " 7.5");
  return value;
}

// A decimal integer in [lo, hi], digits only (no 1e9, no 3.5).
uint64_t parse_integer(const std::string& flag, const std::string& text, uint64_t lo, uint64_t hi) {
  bool digits = !text.empty() && text.size() <= 20;
  for (char ch : text) digits = digits && ch >= '0' && ch <= '9';
  errno = 0;
  const unsigned long long value = digits ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  if (!digits || errno == ERANGE || value < lo || value > hi)
    throw ManifestError(flag + " must be a whole number from " + std::to_string(lo) + " to " + std::to_string(hi) +
                        ", got '" + text + "'");
  return value;
}

// One line: ONNX Runtime's messages span several.
std::string one_line(const char* text) {
  std::string out;
  for (const char* c = text; *c; ++c) {
    const char ch = (*c == '\n' || *c == '\r' || *c == '\t') ? ' ' : *c;
    if (!(ch == ' ' && (out.empty() || out.back() == ' '))) out += ch;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// out.png -> out-0.png, out-1.png, ... for a batch.
std::string numbered(const std::string& path, size_t n, size_t count) {
  if (count <= 1) return path;
  const size_t dot = path.rfind('.');
  return path.substr(0, dot) + "-" + std::to_string(n) + path.substr(dot);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string export_dir, cond_dir, noise_path, out_latents, out_image, custom_ops;
#ifdef SAMG_DEFAULT_CUSTOM_OP_LIBRARY
    // The libsamg_ort.so built with this program, when it is there: the fused kernel then runs for
    // exports whose GuidanceCombine body was stripped (and agrees with the body where it is not).
    if (std::ifstream(SAMG_DEFAULT_CUSTOM_OP_LIBRARY).good()) custom_ops = SAMG_DEFAULT_CUSTOM_OP_LIBRARY;
#endif
    samg::Request request;
    samg::RuntimeOptions options;
    bool has_scale = false, has_w_min = false, has_w_max = false, has_seed = false, timing = false;
    double scale = kDefaultScale, w_min = 0, w_max = 0;
    uint64_t seed = 0;
    int64_t num_images = 1, height = 0, width = 0, frames = 0;
    int repeat = 1;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw ManifestError(arg + " needs a value");
        return argv[++i];
      };
      auto size = [&](int64_t hi) { return static_cast<int64_t>(parse_integer(arg, value(), 1, static_cast<uint64_t>(hi))); };
      if (arg == "-h" || arg == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--cond") cond_dir = value();
      else if (arg == "--noise") noise_path = value();
      else if (arg == "--seed") seed = parse_integer(arg, value(), 0, std::numeric_limits<uint64_t>::max()), has_seed = true;
      else if (arg == "--num-images") num_images = size(kMaxImages);
      else if (arg == "--height") height = size(samg::kMaxImageSide);
      else if (arg == "--width") width = size(samg::kMaxImageSide);
      else if (arg == "--frames") frames = size(samg::kMaxFrames);
      else if (arg == "--guidance") request.guidance = value();
      else if (arg == "--scale") scale = parse_scale(arg, value()), has_scale = true;
      else if (arg == "--w-min") w_min = parse_scale(arg, value()), has_w_min = true;
      else if (arg == "--w-max") w_max = parse_scale(arg, value()), has_w_max = true;
      else if (arg == "--sampler") request.sampler = value();
      else if (arg == "--steps") request.steps = static_cast<int>(size(samg::kMaxTrainTimesteps));
      else if (arg == "--karras") request.karras = true;
      else if (arg == "--threads") options.intra_op_threads = static_cast<int>(parse_integer(arg, value(), 0, kMaxThreads));
      else if (arg == "--custom-op-library") custom_ops = value();
      else if (arg == "--out-latents") out_latents = value();
      else if (arg == "--out-image") out_image = value();
      else if (arg == "--timing") timing = true;
      else if (arg == "--repeat") repeat = static_cast<int>(size(kMaxRepeat));
      else if (!arg.empty() && arg[0] == '-') throw ManifestError("unknown option " + arg + ": see samg-run --help");
      else if (export_dir.empty()) export_dir = arg;
      else throw ManifestError("unexpected argument " + arg + ": see samg-run --help");
    }
    if (export_dir.empty() || cond_dir.empty())
      throw ManifestError("EXPORT_DIR and --cond are required: see samg-run --help");
    if (has_seed == !noise_path.empty()) throw ManifestError("pass --seed N (samg's generator) or --noise noise.npy, one of them");
    if (!has_seed && (num_images != 1 || height || width || frames))
      throw ManifestError("--num-images, --height, --width and --frames size the --seed noise: with --noise, the file sets them");
    if (out_latents.empty() && out_image.empty())
      throw ManifestError("nothing to write: pass --out-latents and/or --out-image");
    if (!out_image.empty() && !ends_with(out_image, ".png") && !ends_with(out_image, ".ppm"))
      throw ManifestError("--out-image must end in .png or .ppm, got " + out_image);
    if (request.guidance != "samg" && request.guidance != "cfg")
      throw ManifestError("guidance '" + request.guidance + "' is not in the C++ runtime: use samg or cfg");
    // Scales as `samg generate` (resolve_scales): samg with --scale W alone spans ((1 + W) / 2, W).
    if (has_w_min != has_w_max) throw ManifestError("pass both --w-min and --w-max, or --scale alone");
    if (has_w_min && has_scale) throw ManifestError("pass either --scale or --w-min/--w-max, not both");
    if (has_w_min) {
      if (request.guidance == "samg" && w_min > w_max)
        throw ManifestError("--w-min (" + std::to_string(w_min) + ") is above --w-max (" + std::to_string(w_max) + "): swap them");
      request.w_min = w_min, request.w_max = w_max;
    } else {
      // Below W = 1 there is no guidance above 1 to halve: w_min = w_max = W (as samg generate).
      request.w_max = scale;
      request.w_min = request.guidance == "samg" ? std::min((1 + scale) / 2, scale) : scale;
    }
    if (custom_ops == "none") custom_ops.clear();
    options.custom_op_library = custom_ops;

    // Everything that can be checked before the work: manifest, request, sizes, output locations.
    const samg::Manifest manifest = samg::read_manifest(export_dir);
    samg::check_request(manifest, request);
    std::vector<int64_t> noise_shape;
    samg::Tensor noise;
    if (has_seed) {
      noise_shape = samg::latent_shape(manifest.latent, num_images, height ? height : manifest.latent.height,
                                       width ? width : manifest.latent.width, frames ? frames : manifest.latent.frames);
    } else {
      noise = samg::read_npy(noise_path);
      noise_shape = noise.shape;
    }
    if (!out_latents.empty()) samg::check_output_path(out_latents, "--out-latents");
    if (!out_image.empty()) {
      if (manifest.latent.layout != "BCHW")
        throw ManifestError("--out-image needs an image (BCHW) export; decode video latents with `samg`");
      const size_t count = noise_shape.empty() ? 1 : static_cast<size_t>(noise_shape[0]);
      for (size_t n = 0; n < count; ++n) samg::check_output_path(numbered(out_image, n, count), "--out-image");
    }
    if (has_seed) noise = samg::standard_normal(seed, noise_shape);

    const auto load_start = std::chrono::steady_clock::now();
    samg::Runtime runtime(export_dir, options);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    std::map<std::string, samg::Tensor> conditioning;
    for (const auto& name : runtime.conditioning_names()) conditioning[name] = samg::read_npy(cond_dir + "/" + name + ".npy");
    samg::Tensor latents;
    nlohmann::json runs = nlohmann::json::array();
    for (int r = 0; r < repeat; ++r) {
      latents = runtime.sample(conditioning, noise, request);
      const samg::Timing& t = runtime.last_timing();
      runs.push_back({{"loop_s", t.loop_s}, {"denoiser_run_s", t.denoiser_run_s}, {"denoiser_calls", t.denoiser_calls}});
    }
    if (timing) {
      const nlohmann::json report = {{"session_load_s", load_s}, {"steps", request.steps}, {"sampler", request.sampler},
                                     {"guidance", request.guidance}, {"runs", runs}};
      std::cout << report.dump() << std::endl;
    }
    if (!out_latents.empty()) samg::write_npy(out_latents, latents);
    if (!out_image.empty()) {
      const auto images = runtime.decode(latents);
      for (size_t n = 0; n < images.size(); ++n) {
        const std::string path = numbered(out_image, n, images.size());
        if (ends_with(path, ".ppm")) samg::write_ppm(path, images[n]);
        else samg::write_png(path, images[n]);
      }
    }
    std::cerr << "samg-run: " << request.steps << " " << request.sampler << " steps, guidance " << request.guidance
              << " (" << request.w_min << ", " << request.w_max << ")\n";
    return 0;
  } catch (const std::invalid_argument& error) {  // ManifestError, NpyError, bad requests
    std::cerr << "samg-run: " << one_line(error.what()) << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "samg-run: " << one_line(error.what()) << "\n";
    return 1;
  }
}

// samg-run: sample an export folder from the command line with the C++ runtime.
//
//   samg-run EXPORT_DIR --cond DIR --noise noise.npy [--guidance samg|cfg] [--scale W | --w-min A --w-max B]
//            [--sampler euler|ddim|dpmpp_2m|flow_euler] [--steps N] [--karras] [--threads N]
//            [--custom-op-library PATH|none] [--out-latents out.npy] [--out-image out.png|out.ppm]
//            [--timing] [--repeat N]
//
// --cond DIR holds one <name>.npy per conditioning input, written by `samg encode`; --noise is the
// standard normal initial noise [B, *latent] (e.g. np.random.default_rng(seed).standard_normal).
// --timing prints one JSON line on stdout: session load time and, per sampling loop, the loop's
// wall time and the time inside the denoiser session's Run calls. --repeat N runs the loop N times
// in this process (the outputs are the last run's), so later runs show warm-session timings.
#include <chrono>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>

#include "samg/runtime.h"

namespace {

constexpr const char* kUsage =
    "usage: samg-run EXPORT_DIR --cond DIR --noise noise.npy [--guidance samg|cfg] [--scale W | --w-min A --w-max B]\n"
    "                [--sampler euler|ddim|dpmpp_2m|flow_euler] [--steps N] [--karras] [--threads N]\n"
    "                [--custom-op-library PATH|none] [--out-latents out.npy] [--out-image out.png|out.ppm]\n"
    "                [--timing] [--repeat N]\n";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0') throw std::invalid_argument(flag + " needs a number, got '" + text + "'");
  return value;
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
    double scale = -1, w_min = -1, w_max = -1;
    bool timing = false;
    int repeat = 1;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
        return argv[++i];
      };
      if (arg == "-h" || arg == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (arg == "--cond") cond_dir = value();
      else if (arg == "--noise") noise_path = value();
      else if (arg == "--guidance") request.guidance = value();
      else if (arg == "--scale") scale = parse_number(arg, value());
      else if (arg == "--w-min") w_min = parse_number(arg, value());
      else if (arg == "--w-max") w_max = parse_number(arg, value());
      else if (arg == "--sampler") request.sampler = value();
      else if (arg == "--steps") request.steps = static_cast<int>(parse_number(arg, value()));
      else if (arg == "--karras") request.karras = true;
      else if (arg == "--threads") options.intra_op_threads = static_cast<int>(parse_number(arg, value()));
      else if (arg == "--custom-op-library") custom_ops = value();
      else if (arg == "--out-latents") out_latents = value();
      else if (arg == "--out-image") out_image = value();
      else if (arg == "--timing") timing = true;
      else if (arg == "--repeat") repeat = static_cast<int>(parse_number(arg, value()));
      else if (!arg.empty() && arg[0] == '-') throw std::invalid_argument("unknown option " + arg + "\n" + kUsage);
      else if (export_dir.empty()) export_dir = arg;
      else throw std::invalid_argument("unexpected argument " + arg + "\n" + kUsage);
    }
    if (export_dir.empty() || cond_dir.empty() || noise_path.empty())
      throw std::invalid_argument(std::string("EXPORT_DIR, --cond and --noise are required\n") + kUsage);
    if (out_latents.empty() && out_image.empty())
      throw std::invalid_argument("nothing to write: pass --out-latents and/or --out-image");
    // Scales as `samg generate`: samg with --scale W alone spans ((1 + W) / 2, W).
    if ((w_min < 0) != (w_max < 0)) throw std::invalid_argument("pass both --w-min and --w-max, or --scale alone");
    if (w_min >= 0 && scale >= 0) throw std::invalid_argument("pass either --scale or --w-min/--w-max, not both");
    if (w_min >= 0) {
      request.w_min = w_min, request.w_max = w_max;
    } else {
      const double w = scale >= 0 ? scale : 7.5;
      request.w_max = w;
      request.w_min = request.guidance == "samg" ? (1 + w) / 2 : w;
    }
    if (repeat < 1) throw std::invalid_argument("--repeat must be at least 1");
    if (custom_ops == "none") custom_ops.clear();
    options.custom_op_library = custom_ops;

    const auto load_start = std::chrono::steady_clock::now();
    samg::Runtime runtime(export_dir, options);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
    std::map<std::string, samg::Tensor> conditioning;
    for (const auto& name : runtime.conditioning_names()) conditioning[name] = samg::read_npy(cond_dir + "/" + name + ".npy");
    const samg::Tensor noise = samg::read_npy(noise_path);
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
        std::string path = out_image;
        if (images.size() > 1) {  // out.png -> out-0.png, out-1.png, ...
          const size_t dot = path.rfind('.');
          path = path.substr(0, dot) + "-" + std::to_string(n) + path.substr(dot);
        }
        if (ends_with(path, ".ppm")) samg::write_ppm(path, images[n]);
        else if (ends_with(path, ".png")) samg::write_png(path, images[n]);
        else throw std::invalid_argument("--out-image must end in .png or .ppm");
      }
    }
    std::cerr << "samg-run: " << request.steps << " " << request.sampler << " steps, guidance " << request.guidance
              << " (" << request.w_min << ", " << request.w_max << ")\n";
    return 0;
  } catch (const std::invalid_argument& error) {
    std::cerr << "samg-run: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "samg-run: " << error.what() << "\n";
    return 1;
  }
}

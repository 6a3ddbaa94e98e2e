// Embedding samg's C++ runtime in a program: load an export once, then sample from a seed.
//
//   samg-embed-example EXPORT_DIR COND_DIR SEED OUT.npy
//
// COND_DIR holds the conditioning from `samg encode` (<name>.npy, [2, ...]: negative, prompt).
// Writes the final latents of one 20-step Euler SAMG sample (w 2..5) to OUT.npy; the same seed
// gives the same noise as `samg generate --seed SEED` and `samg-run --seed SEED`.
// A service would keep `runtime` and `conditioning` and call sample() per request (one thread
// per Runtime at a time); serving itself belongs to a real server, not to this example.
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <string>

#include "samg/rng.h"
#include "samg/runtime.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: samg-embed-example EXPORT_DIR COND_DIR SEED OUT.npy\n";
    return 2;
  }
  try {
    const std::string export_dir = argv[1], cond_dir = argv[2], out = argv[4];
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(argv[3], &end, 10);
    if (*argv[3] == '\0' || *end != '\0' || *argv[3] == '-') throw samg::ManifestError("SEED must be a whole number");
    samg::check_output_path(out, "OUT.npy");

    samg::Runtime runtime(export_dir, samg::RuntimeOptions{});  // checks samg.json, loads the sessions
    std::map<std::string, samg::Tensor> conditioning;
    for (const auto& name : runtime.conditioning_names())
      conditioning[name] = samg::read_npy(cond_dir + "/" + name + ".npy");

    samg::Request request;
    request.guidance = "samg";
    request.w_min = 2.0;
    request.w_max = 5.0;
    request.sampler = "euler";
    request.steps = 20;
    const samg::LatentSpec& latent = runtime.manifest().latent;
    const auto shape = samg::latent_shape(latent, /*batch*/ 1, latent.height, latent.width, latent.frames);
    const samg::Tensor latents = runtime.sample(conditioning, samg::standard_normal(seed, shape), request);
    samg::write_npy(out, latents);
    std::cerr << "samg-embed-example: wrote " << out << " " << latents.shape_text() << "\n";
    return 0;
  } catch (const std::invalid_argument& error) {
    std::cerr << "samg-embed-example: " << error.what() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "samg-embed-example: " << error.what() << "\n";
    return 1;
  }
}

// Bounds on what samg's C++ runtime accepts, defined once (manifest checks, samg-run, .npy reader).
#pragma once

#include <cstdint>

namespace samg {

constexpr double kMaxGuidanceScale = 100.0;         // guidance scales are in [0, kMaxGuidanceScale]
constexpr int64_t kMaxTrainTimesteps = 100000;      // scheduler.num_train_timesteps
constexpr int64_t kMaxLatentElements = int64_t{1} << 24;  // all latents of one call: 64 MiB of float32
constexpr int64_t kMaxTensorElements = int64_t{1} << 28;  // any other input tensor (.npy): 1 GiB of float32
constexpr int64_t kMaxImageSide = 16384;            // pixels: latent.height/width and --height/--width
constexpr int64_t kMaxFrames = 4096;                // latent.frames and --frames
constexpr int64_t kMaxLatentChannels = 4096;
constexpr int64_t kMaxSpatialFactor = 64;
// |denoiser output| beyond this is a broken model or a runaway scale, not a prediction: epsilon,
// v and flow velocity are O(1) per element, and O(kMaxGuidanceScale) at the largest scale.
constexpr double kMaxPredictionMagnitude = 1e4;

}  // namespace samg

// One seeded generator for every runtime: standard normals from Philox4x32-10, bit-identical to
// samg/rng.py (same seed, same noise, same image in `samg generate` and `samg-run --seed`).
// Element i (flat C-order index) depends only on (seed, i); see samg/rng.py for the recipe.
// Compiled with -ffp-contract=off: ln and cos are fixed polynomials in +, -, *, / and sqrt, so
// every rounding is IEEE-defined and the output is the same on every CPU and compiler.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "samg/npy.h"

namespace samg {

constexpr int kPhiloxRounds = 10;

// Philox4x32-`rounds` (Salmon et al. 2011; Random123's philox4x32_R).
std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key,
                                   int rounds = kPhiloxRounds);

// out[i] = the standard normal at counter first_index + i, for i < count.
void standard_normal(uint64_t seed, uint64_t first_index, float* out, size_t count);

// Standard normals of `shape` (sizes already checked by the caller).
Tensor standard_normal(uint64_t seed, const std::vector<int64_t>& shape);

}  // namespace samg

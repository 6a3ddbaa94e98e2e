// Philox4x32-10 standard normals, operation for operation as samg/rng.py (keep the two in step).
#include "samg/rng.h"

#include <cmath>

namespace samg {
namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;  // key increments
constexpr int kLogTerms = 11;
constexpr double kLn2 = 0x1.62e42fefa39efp-1;
constexpr double kHalfPi = 0x1.921fb54442d18p+0;
constexpr double kSqrtHalf = 0x1.6a09e667f3bcdp-1;
// 1/n!, correctly rounded: sin (odd n <= 17), cos (even n <= 18), on [0, pi/4].
constexpr double kSinCoeffs[] = {0x1.0000000000000p+0,  -0x1.5555555555555p-3, 0x1.1111111111111p-7,
                                 -0x1.a01a01a01a01ap-13, 0x1.71de3a556c734p-19, -0x1.ae64567f544e4p-26,
                                 0x1.6124613a86d09p-33,  -0x1.ae7f3e733b81fp-41, 0x1.952c77030ad4ap-49};
constexpr double kCosCoeffs[] = {0x1.0000000000000p+0,  -0x1.0000000000000p-1, 0x1.5555555555555p-5,
                                 -0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-16, -0x1.27e4fb7789f5cp-22,
                                 0x1.1eed8eff8d898p-29,  -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45,
                                 -0x1.6827863b97d97p-53};

// ln u for u in (0, 1]: frexp and *2 are exact; 2 atanh(s) series in a fixed order.
double log_unit(double u) {
  int e = 0;
  double m = std::frexp(u, &e);
  if (m < kSqrtHalf) m *= 2.0, e -= 1;
  const double s = (m - 1.0) / (m + 1.0);
  const double z = s * s;
  double series = 1.0 / (2 * kLogTerms - 1);
  for (int k = kLogTerms - 2; k >= 0; --k) series = series * z + 1.0 / (2 * k + 1);
  return static_cast<double>(e) * kLn2 + 2.0 * s * series;
}

template <size_t N>
double poly(double x2, const double (&coeffs)[N]) {
  double acc = coeffs[N - 1];
  for (size_t i = N - 1; i-- > 0;) acc = acc * x2 + coeffs[i];
  return acc;
}

// cos(2 pi u) for u in [0, 1): exact reduction to an angle in [0, pi/4].
double cos_turns(double u) {
  const double t = u * 4.0;
  const double quadrant = std::floor(t);
  const double f = t - quadrant;
  const bool upper = f > 0.5;
  const double phi = (upper ? 1.0 - f : f) * kHalfPi;
  const double phi2 = phi * phi;
  const double sin_phi = phi * poly(phi2, kSinCoeffs), cos_phi = poly(phi2, kCosCoeffs);
  const double cos_f = upper ? sin_phi : cos_phi, sin_f = upper ? cos_phi : sin_phi;
  switch (static_cast<int>(quadrant)) {
    case 0: return cos_f;
    case 1: return -sin_f;
    case 2: return -cos_f;
    default: return sin_f;
  }
}

}  // namespace

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> key, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    if (r) key[0] += kPhiloxW0, key[1] += kPhiloxW1;  // bumped before every round but the first
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c[0], p1 = static_cast<uint64_t>(kPhiloxM1) * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ key[0], static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ key[1], static_cast<uint32_t>(p0)};
  }
  return c;
}

void standard_normal(uint64_t seed, uint64_t first_index, float* out, size_t count) {
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (size_t i = 0; i < count; ++i) {
    const uint64_t index = first_index + i;
    const auto x = philox4x32({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0, 0}, key);
    const uint64_t bits1 = (static_cast<uint64_t>(x[0]) << 21) | (x[1] >> 11);
    const uint64_t bits2 = (static_cast<uint64_t>(x[2]) << 21) | (x[3] >> 11);
    const double u1 = static_cast<double>(bits1 + 1) * 0x1p-53;  // (0, 1]
    const double u2 = static_cast<double>(bits2) * 0x1p-53;      // [0, 1)
    out[i] = static_cast<float>(std::sqrt(-2.0 * log_unit(u1)) * cos_turns(u2));
  }
}

Tensor standard_normal(uint64_t seed, const std::vector<int64_t>& shape) {
  Tensor t;
  t.shape = shape;
  t.data.resize(static_cast<size_t>(t.size()));
  standard_normal(seed, 0, t.data.data(), t.data.size());
  return t;
}

}  // namespace samg

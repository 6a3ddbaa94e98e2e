// samg-noise SEED OUT.npy DIM...: samg's seeded standard normals (samg::standard_normal) as a
// float32 .npy, for checking that the C++ and Python generators agree bit for bit.
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include "samg/rng.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: samg-noise SEED OUT.npy DIM...\n";
    return 2;
  }
  try {
    const unsigned long long seed = std::strtoull(argv[1], nullptr, 10);
    std::vector<int64_t> shape;
    int64_t count = 1;
    for (int i = 3; i < argc; ++i) {
      const long long d = std::strtoll(argv[i], nullptr, 10);
      if (d < 1 || d > samg::kMaxTensorElements || count * d > samg::kMaxTensorElements) {
        std::cerr << "samg-noise: sizes must be positive, " << samg::kMaxTensorElements << " values at most\n";
        return 2;
      }
      shape.push_back(d);
      count *= d;
    }
    samg::write_npy(argv[2], samg::standard_normal(seed, shape));
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "samg-noise: " << error.what() << "\n";
    return 1;
  }
}

// Minimal .npy (format 1.0/2.0) reader and writer for float32 tensors, C order.
// Reads float32 and float64 (converted), little-endian; enough for `samg encode` outputs and noise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace samg {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  int64_t size() const;
  std::string shape_text() const;
};

// Throws std::runtime_error naming the file and the problem.
Tensor read_npy(const std::string& path);
void write_npy(const std::string& path, const Tensor& tensor);

}  // namespace samg

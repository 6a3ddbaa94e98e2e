// Minimal .npy (format 1.0/2.0) reader and writer for float32 tensors, C order; atomic file writes.
// Reads float32 and float64 (converted), little-endian; enough for `samg encode` outputs and noise.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "samg/limits.h"

namespace samg {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  int64_t size() const;
  std::string shape_text() const;
};

// A .npy file that cannot be used (missing, damaged, wrong dtype, too large): bad input.
struct NpyError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Throws NpyError naming the file and the problem. The declared shape is checked against
// `max_elements` and against the file's size before anything is allocated.
Tensor read_npy(const std::string& path, int64_t max_elements = kMaxTensorElements);
void write_npy(const std::string& path, const Tensor& tensor);

// Writes `bytes` to a fresh temp file in `path`'s folder, then renames it over `path`; on any
// failure the temp file is removed and std::runtime_error names `path`.
void write_file_atomic(const std::string& path, const std::string& bytes);
// NpyError unless `path` can be written as a file: its folder exists and is writable, and
// `path` is not a folder. `flag` names the option in the message.
void check_output_path(const std::string& path, const std::string& flag);

}  // namespace samg

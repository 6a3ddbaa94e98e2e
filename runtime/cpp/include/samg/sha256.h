// SHA-256 (FIPS 180-4), for checking the files an export loads against the hashes in samg.json.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace samg {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  // The digest as 64 lowercase hex digits; the object is spent afterwards.
  std::string hex_digest();

 private:
  void block(const uint8_t* p);
  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_{};
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

// 64 lowercase hex digits of a file's SHA-256; std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace samg

// samg-sha256 FILE...: each file's SHA-256 (samg::sha256_file, the hash samg-run checks exports
// with), one "HEX  FILE" line each, as sha256sum; tests/test_native_cpp_schedules.py checks it on
// FIPS 180-4's examples.
#include <exception>
#include <iostream>

#include "samg/sha256.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: samg-sha256 FILE...\n";
    return 2;
  }
  try {
    for (int i = 1; i < argc; ++i) std::cout << samg::sha256_file(argv[i]) << "  " << argv[i] << "\n";
    return 0;
  } catch (const std::exception& error) {
    std::cerr << "samg-sha256: " << error.what() << "\n";
    return 1;
  }
}

#include "samg/npy.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace samg {

int64_t Tensor::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Tensor::shape_text() const {
  std::ostringstream text;
  text << "[";
  for (size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << "]";
  return text.str();
}

namespace {

// Value of `'key': value` in the header dict, as raw text up to the next top-level comma.
std::string header_field(const std::string& header, const std::string& key) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  size_t start = header.find(':', at) + 1;
  while (start < header.size() && header[start] == ' ') ++start;
  if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
  const size_t end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

}  // namespace

Tensor read_npy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  char magic[8];
  file.read(magic, 8);
  if (!file || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t header_length = 0;
  if (magic[6] == 1) {
    uint16_t length16 = 0;
    file.read(reinterpret_cast<char*>(&length16), 2);
    header_length = length16;
  } else {
    file.read(reinterpret_cast<char*>(&header_length), 4);
  }
  std::string header(header_length, '\0');
  file.read(&header[0], header_length);
  const std::string descr = header_field(header, "descr");
  const bool is_f4 = descr.find("<f4") != std::string::npos, is_f8 = descr.find("<f8") != std::string::npos;
  if (!is_f4 && !is_f8) throw std::runtime_error(path + ": dtype " + descr + " is not float32/float64 little-endian");
  if (header_field(header, "fortran_order").find("True") != std::string::npos)
    throw std::runtime_error(path + ": Fortran order is not supported (save with np.ascontiguousarray)");
  Tensor tensor;
  std::istringstream dims(header_field(header, "shape"));
  char ch;
  dims >> ch;  // '('
  int64_t value;
  while (dims >> value) {
    tensor.shape.push_back(value);
    dims >> ch;  // ',' or ')'
  }
  tensor.data.resize(static_cast<size_t>(tensor.size()));
  if (is_f4) {
    file.read(reinterpret_cast<char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size() * 4));
  } else {
    std::vector<double> wide(tensor.data.size());
    file.read(reinterpret_cast<char*>(wide.data()), static_cast<std::streamsize>(wide.size() * 8));
    for (size_t i = 0; i < wide.size(); ++i) tensor.data[i] = static_cast<float>(wide[i]);
  }
  if (!file) throw std::runtime_error(path + " is truncated: expected " + std::to_string(tensor.size()) + " values");
  return tensor;
}

void write_npy(const std::string& path, const Tensor& tensor) {
  std::string shape = "(";
  for (size_t i = 0; i < tensor.shape.size(); ++i) shape += std::to_string(tensor.shape[i]) + (tensor.shape.size() == 1 ? "," : (i + 1 < tensor.shape.size() ? ", " : ""));
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad so that the data starts on a 64-byte boundary; the header ends with '\n'.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  const std::string tmp = path + ".tmp";
  {
    std::ofstream file(tmp, std::ios::binary | std::ios::trunc);
    if (!file) throw std::runtime_error("cannot write " + path);
    const uint16_t length = static_cast<uint16_t>(header.size());
    file.write("\x93NUMPY\x01\x00", 8);
    file.write(reinterpret_cast<const char*>(&length), 2);
    file.write(header.data(), static_cast<std::streamsize>(header.size()));
    file.write(reinterpret_cast<const char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size() * 4));
    if (!file) throw std::runtime_error("failed writing " + path);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
}

}  // namespace samg

#include "samg/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
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

// Value of `'key': value` in the header dict, as raw text up to the next top-level comma ("" if absent).
std::string header_field(const std::string& header, const std::string& key) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  const size_t colon = header.find(':', at);
  if (colon == std::string::npos) return "";
  size_t start = colon + 1;
  while (start < header.size() && header[start] == ' ') ++start;
  if (start >= header.size()) return "";
  if (header[start] == '(') {
    const size_t close = header.find(')', start);
    return close == std::string::npos ? "" : header.substr(start, close - start + 1);
  }
  const size_t end = header.find_first_of(",}", start);
  return header.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

constexpr uint32_t kMaxNpyHeader = 1 << 16;  // numpy writes a few hundred bytes

}  // namespace

Tensor read_npy(const std::string& path, int64_t max_elements) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw NpyError("cannot open " + path + ": check the path");
  file.seekg(0, std::ios::end);
  const int64_t file_size = static_cast<int64_t>(file.tellg());
  file.seekg(0);
  char magic[8];
  file.read(magic, 8);
  if (!file || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw NpyError(path + " is not a .npy file: save it with numpy.save");
  uint32_t header_length = 0;
  if (magic[6] == 1) {
    uint16_t length16 = 0;
    file.read(reinterpret_cast<char*>(&length16), 2);
    header_length = length16;
  } else {
    file.read(reinterpret_cast<char*>(&header_length), 4);
  }
  if (!file || header_length > kMaxNpyHeader) throw NpyError(path + ": damaged .npy header: save it again with numpy.save");
  std::string header(header_length, '\0');
  file.read(&header[0], header_length);
  if (!file) throw NpyError(path + ": damaged .npy header: save it again with numpy.save");
  const std::string descr = header_field(header, "descr");
  const bool is_f4 = descr.find("<f4") != std::string::npos, is_f8 = descr.find("<f8") != std::string::npos;
  if (!is_f4 && !is_f8) throw NpyError(path + ": dtype " + descr + " is not float32/float64 little-endian: save a float32 array");
  if (header_field(header, "fortran_order").find("True") != std::string::npos)
    throw NpyError(path + ": Fortran order is not supported (save with np.ascontiguousarray)");
  const std::string shape_text = header_field(header, "shape");
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')')
    throw NpyError(path + ": damaged .npy header (no shape): save it again with numpy.save");
  Tensor tensor;
  std::istringstream dims(shape_text.substr(1, shape_text.size() - 2));
  for (std::string item; std::getline(dims, item, ',');) {
    const size_t first = item.find_first_not_of(' ');
    if (first == std::string::npos) continue;  // trailing comma of a 1-tuple
    char* end = nullptr;
    const long long value = std::strtoll(item.c_str() + first, &end, 10);
    if (end == item.c_str() + first || value < 0) throw NpyError(path + ": bad shape " + shape_text + " in the .npy header");
    tensor.shape.push_back(value);
  }
  // Bound the size before allocating: by the caller's limit and by what the file really holds.
  const int64_t item_size = is_f4 ? 4 : 8;
  int64_t count = 1;
  for (int64_t d : tensor.shape) {
    if (d != 0 && count > max_elements / d)
      throw NpyError(path + " declares shape " + tensor.shape_text() + ", over " + std::to_string(max_elements) +
                     " values: pass a smaller array");
    count *= d;
  }
  const int64_t data_bytes = file_size - static_cast<int64_t>(file.tellg());
  if (data_bytes != count * item_size)
    throw NpyError(path + " holds " + std::to_string(data_bytes) + " data bytes, its header's shape " + tensor.shape_text() +
                   " needs " + std::to_string(count * item_size) + ": the file is damaged, save it again");
  tensor.data.resize(static_cast<size_t>(count));
  if (is_f4) {
    file.read(reinterpret_cast<char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size() * 4));
  } else {
    std::vector<double> wide(tensor.data.size());
    file.read(reinterpret_cast<char*>(wide.data()), static_cast<std::streamsize>(wide.size() * 8));
    for (size_t i = 0; i < wide.size(); ++i) tensor.data[i] = static_cast<float>(wide[i]);
  }
  if (!file) throw NpyError(path + " is truncated: expected " + std::to_string(tensor.size()) + " values");
  return tensor;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const size_t slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  // Hidden, unique name in the same folder (same file system: the rename is atomic).
  std::string tmp = folder + "/." + name + ".tmp-XXXXXX";
  const int fd = mkstemp(&tmp[0]);
  if (fd < 0) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  const bool ok = written == bytes.size() && ::fchmod(fd, 0644) == 0;
  const int close_status = ::close(fd);
  if (!ok || close_status != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write " + path + ": " + reason);
  }
}

void check_output_path(const std::string& path, const std::string& flag) {
  if (path.empty()) throw NpyError(flag + " is empty: pass a file path");
  struct stat info {};
  if (stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode))
    throw NpyError(flag + " " + path + " is a folder: pass a file path inside it");
  const size_t slash = path.rfind('/');
  const std::string folder = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  if (stat(folder.c_str(), &info) != 0 || !S_ISDIR(info.st_mode))
    throw NpyError(flag + " " + path + ": folder " + folder + " does not exist: create it first");
  if (access(folder.c_str(), W_OK) != 0)
    throw NpyError(flag + " " + path + ": folder " + folder + " is not writable: pick another location");
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
  const uint16_t length = static_cast<uint16_t>(header.size());
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes.append(reinterpret_cast<const char*>(&length), 2);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(tensor.data.data()), tensor.data.size() * 4);
  write_file_atomic(path, bytes);
}

}  // namespace samg

#include "samg/verify.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "samg/sha256.h"

namespace samg {
namespace {

using Json = nlohmann::json;

constexpr const char* kReexport = "re-export the model with `samg export`";
constexpr const char* kExternalDataSuffix = ".data";  // samg.export.exporter: NAME.onnx.data beside NAME.onnx
constexpr std::streamoff kMaxStampBytes = 16 << 20;   // as samg.json (samg.contract.MAX_MANIFEST_BYTES)

// The stamp's entries ({} for no stamp, or one samg cannot use: then every file is hashed).
Json read_stamp(const std::string& export_dir) {
  std::ifstream file(export_dir + "/" + kVerifiedStamp, std::ios::binary | std::ios::ate);
  if (!file || file.tellg() > kMaxStampBytes) return Json::object();
  file.seekg(0);
  std::stringstream text;
  text << file.rdbuf();
  const Json stamp = Json::parse(text.str(), nullptr, /*allow_exceptions*/ false);
  if (!stamp.is_object() || stamp.value("format", Json()) != kVerifiedFormat || !stamp.contains("files") ||
      !stamp["files"].is_object())
    return Json::object();
  return stamp["files"];
}

void verify_one(const std::string& export_dir, const std::string& name, const Manifest& manifest, const Json& stamp) {
  const auto listed = manifest.file_hashes.find(name);
  if (listed == manifest.file_hashes.end())
    throw ManifestError("samg.json lists no hash for " + name + ", which the runtime loads, so it cannot be verified: " +
                        kReexport);
  const std::string path = export_dir + "/" + name;
  struct stat info {};
  if (stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
    throw ManifestError(path + " is missing from the export (listed in samg.json): " + kReexport);
  const std::string& digest = listed->second;  // "sha256:<64 hex>", checked by read_manifest
  // The stamp entry the Python side writes for a file that matched: exactly these three fields.
  const int64_t mtime_ns = static_cast<int64_t>(info.st_mtim.tv_sec) * 1000000000 + info.st_mtim.tv_nsec;
  const Json expected = {{"size", static_cast<int64_t>(info.st_size)}, {"mtime_ns", mtime_ns}, {"sha256", digest}};
  const auto entry = stamp.find(name);
  if (entry != stamp.end() && *entry == expected) return;
  std::string actual;
  try {
    actual = "sha256:" + sha256_file(path);
  } catch (const std::runtime_error& error) {
    throw ManifestError(error.what());
  }
  if (actual != digest)
    throw ManifestError(path + " does not match its sha256 in samg.json (changed or corrupted since export): " + kReexport);
}

}  // namespace

void verify_loaded_files(const Manifest& manifest, const std::string& export_dir) {
  const Json stamp = read_stamp(export_dir);
  for (const std::string* graph : {&manifest.denoiser_file, &manifest.vae_file}) {
    verify_one(export_dir, *graph, manifest, stamp);
    // ONNX Runtime also reads the graph's external weights, when the export wrote them.
    const std::string data = *graph + kExternalDataSuffix;
    struct stat info {};
    if (manifest.file_hashes.count(data) || stat((export_dir + "/" + data).c_str(), &info) == 0)
      verify_one(export_dir, data, manifest, stamp);
  }
}

}  // namespace samg

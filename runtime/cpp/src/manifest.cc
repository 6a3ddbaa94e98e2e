#include "samg/manifest.h"

#include <cctype>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <sys/stat.h>

namespace samg {
namespace {

using Json = nlohmann::json;

constexpr const char* kReexport = "re-export the model with `samg export`";
// Python's json writes NaN/Infinity for non-finite floats (not JSON): they are read as strings
// carrying this prefix, so that the field check names the field ("got NaN") instead of the parser
// failing at a byte offset.
constexpr const char* kNonFiniteMark = "samg-non-finite-number:";

[[noreturn]] void fail(const std::string& field, const std::string& problem, const std::string& fix = kReexport) {
  throw ManifestError("samg.json: " + field + " " + problem + ": " + fix);
}

std::string shown(const Json& value) {
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    if (s.rfind(kNonFiniteMark, 0) == 0) return s.substr(std::char_traits<char>::length(kNonFiniteMark));
  }
  std::string text = value.dump(-1, ' ', true, Json::error_handler_t::replace);
  return text.size() > 40 ? text.substr(0, 37) + "..." : text;
}

// Bare NaN / Infinity / -Infinity outside strings -> marked strings; everything else unchanged.
std::string mark_non_finite(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      out += ch;
      if (ch == '\\' && i + 1 < text.size()) out += text[++i];
      else if (ch == '"') in_string = false;
      continue;
    }
    if (ch == '"') in_string = true;
    bool replaced = false;
    for (const char* token : {"-Infinity", "Infinity", "NaN"}) {
      if (text.compare(i, std::char_traits<char>::length(token), token) == 0) {
        out += std::string("\"") + kNonFiniteMark + token + "\"";
        i += std::char_traits<char>::length(token) - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += ch;
  }
  return out;
}

// One JSON object of the manifest, with its dotted path for messages.
class Section {
 public:
  Section(const Json& root, const std::string& key) : path_(key) {
    const auto it = root.find(key);
    if (it == root.end()) fail(key, "is missing");
    if (!it->is_object()) fail(key, "must be an object, got " + shown(*it));
    obj_ = &*it;
  }

  bool has(const char* key) const {
    const auto it = obj_->find(key);
    return it != obj_->end() && !it->is_null();
  }
  const Json& at(const char* key) const {
    if (!has(key)) fail(field(key), "is missing");
    return (*obj_)[key];
  }
  std::string field(const char* key) const { return path_ + "." + key; }

  std::string string(const char* key) const {
    const Json& v = at(key);
    if (!v.is_string() || v.get_ref<const std::string&>().rfind(kNonFiniteMark, 0) == 0)
      fail(field(key), "must be a string, got " + shown(v));
    return v.get<std::string>();
  }
  std::string choice(const char* key, std::initializer_list<const char*> allowed) const {
    const Json& v = at(key);
    std::string list;
    for (const char* a : allowed) {
      if (v.is_string() && v.get_ref<const std::string&>() == a) return a;
      list += std::string(list.empty() ? "" : ", ") + a;
    }
    fail(field(key), "must be one of " + list + ", got " + shown(v));
  }
  double number(const char* key, double lo, double hi, bool lo_open = false, bool hi_open = false) const {
    const Json& v = at(key);
    const double x = v.is_number() ? v.get<double>() : NAN;
    if (!v.is_number() || !std::isfinite(x) || x < lo || x > hi || (lo_open && x == lo) || (hi_open && x == hi)) {
      std::ostringstream range;
      range << "must be a finite number in " << (lo_open ? "(" : "[") << lo << ", " << hi << (hi_open ? ")" : "]");
      fail(field(key), range.str() + ", got " + shown(v));
    }
    return x;
  }
  int64_t integer(const char* key, int64_t lo, int64_t hi) const {
    const Json& v = at(key);
    const bool ok = (v.is_number_integer() && v.get<int64_t>() >= lo && v.get<int64_t>() <= hi &&
                     !(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)));
    if (!ok) {
      const std::string what = lo == 1 && hi == INT64_MAX ? "a positive integer"
                               : "an integer from " + std::to_string(lo) + " to " + std::to_string(hi);
      fail(field(key), "must be " + what + ", got " + shown(v));
    }
    return v.get<int64_t>();
  }
  bool boolean(const char* key) const {
    const Json& v = at(key);
    if (!v.is_boolean()) fail(field(key), "must be true or false, got " + shown(v));
    return v.get<bool>();
  }
  // A file named relative to the export folder, inside it (after resolving links), existing.
  std::string file(const char* key, const std::string& export_dir) const {
    const std::string name = string(key);
    if (name.empty() || name[0] == '/') fail(field(key), "must be a path relative to the export folder, got " + shown(at(key)));
    std::istringstream parts(name);
    for (std::string part; std::getline(parts, part, '/');)
      if (part == "..") fail(field(key), "must stay inside the export folder (no '..'), got " + shown(at(key)));
    const std::string path = export_dir + "/" + name;
    char* dir_real = realpath(export_dir.c_str(), nullptr);
    char* file_real = realpath(path.c_str(), nullptr);
    const std::string dir_text = dir_real ? dir_real : "", file_text = file_real ? file_real : "";
    std::free(dir_real);
    std::free(file_real);
    struct stat info {};
    if (file_text.empty() || stat(file_text.c_str(), &info) != 0 || !S_ISREG(info.st_mode))
      fail(field(key), "names " + name + ", which is not a file in " + export_dir, "re-export the model or restore the file");
    if (file_text.rfind(dir_text + "/", 0) != 0)
      fail(field(key), "names " + name + ", which resolves outside the export folder (" + file_text + ")", kReexport);
    return path;
  }

 private:
  std::string path_;
  const Json* obj_ = nullptr;
};

SchedulerSpec read_scheduler(const Json& root) {
  const Section s(root, "scheduler");
  SchedulerSpec spec;
  spec.kind = s.has("kind") ? s.choice("kind", {"discrete", "flow"}) : "discrete";
  // 2 at least: a schedule interpolates between neighbouring training timesteps.
  if (s.has("num_train_timesteps")) spec.num_train_timesteps = static_cast<int>(s.integer("num_train_timesteps", 2, kMaxTrainTimesteps));
  if (spec.kind == "flow") {
    if (s.has("shift")) spec.shift = s.number("shift", 0.0, 1000.0, /*lo_open*/ true);
    return spec;
  }
  if (s.has("beta_start")) spec.beta_start = s.number("beta_start", 0.0, 1.0, true, true);
  if (s.has("beta_end")) spec.beta_end = s.number("beta_end", 0.0, 1.0, true, true);
  if (s.has("beta_schedule")) spec.beta_schedule = s.choice("beta_schedule", {"linear", "scaled_linear", "squaredcos_cap_v2"});
  if (s.has("timestep_spacing")) spec.timestep_spacing = s.choice("timestep_spacing", {"leading", "trailing", "linspace"});
  if (s.has("steps_offset")) spec.steps_offset = static_cast<int>(s.integer("steps_offset", 0, spec.num_train_timesteps - 1));
  if (s.has("rescale_betas_zero_snr")) spec.rescale_betas_zero_snr = s.boolean("rescale_betas_zero_snr");
  if (s.has("set_alpha_to_one")) spec.set_alpha_to_one = s.boolean("set_alpha_to_one");
  if (s.has("clip_sample") && s.boolean("clip_sample"))
    fail(s.field("clip_sample"), "is true (the scheduler clips x0), which samg's samplers do not do",
         "sample this model with diffusers");
  // CogVideoXDDIMScheduler's recipe: alphas_cumprod shifted, then rescaled to zero terminal SNR.
  if (s.has("snr_shift_scale")) spec.snr_shift_scale = s.number("snr_shift_scale", 0.0, 1e6, /*lo_open*/ true);
  return spec;
}

LatentSpec read_latent(const Json& root) {
  const Section s(root, "latent");
  LatentSpec spec;
  spec.layout = s.choice("layout", {"BCHW", "BCFHW", "BFCHW"});
  spec.channels = s.integer("channels", 1, kMaxLatentChannels);
  spec.spatial_factor = s.integer("spatial_factor", 1, kMaxSpatialFactor);
  if (s.has("temporal_factor")) spec.temporal_factor = s.integer("temporal_factor", 1, kMaxFrames);
  spec.height = s.integer("height", 1, kMaxImageSide);
  spec.width = s.integer("width", 1, kMaxImageSide);
  spec.size_multiple = s.has("size_multiple") ? s.integer("size_multiple", 1, kMaxImageSide) : spec.spatial_factor;
  if (spec.size_multiple % spec.spatial_factor)
    fail(s.field("size_multiple"), "must be a multiple of latent.spatial_factor (" + std::to_string(spec.spatial_factor) +
                                       "), got " + std::to_string(spec.size_multiple));
  if (spec.height % spec.size_multiple || spec.width % spec.size_multiple)
    fail("latent.height/width", "must be multiples of " + std::to_string(spec.size_multiple) + ", got " +
                                    std::to_string(spec.height) + "x" + std::to_string(spec.width));
  if (s.has("dynamic_resolution")) spec.dynamic_resolution = s.boolean("dynamic_resolution");
  if (s.has("dynamic_frames")) spec.dynamic_frames = s.boolean("dynamic_frames");
  if (spec.layout != "BCHW") {
    spec.frames = s.integer("frames", 1, kMaxFrames);
    if ((spec.frames - 1) % spec.temporal_factor)
      fail(s.field("frames"), "must be 1 + a multiple of latent.temporal_factor (" + std::to_string(spec.temporal_factor) +
                                  "), got " + std::to_string(spec.frames));
  }
  latent_shape(spec, 1, spec.height, spec.width, spec.frames);  // the export's own size fits the bounds
  return spec;
}

}  // namespace

SchedulerSpec read_scheduler_spec(const nlohmann::json& scheduler) { return read_scheduler(Json{{"scheduler", scheduler}}); }

std::vector<int64_t> latent_shape(const LatentSpec& latent, int64_t batch, int64_t height, int64_t width,
                                  int64_t frames) {
  const int64_t m = latent.size_multiple;
  if (height < 1 || width < 1 || height > kMaxImageSide || width > kMaxImageSide || height % m || width % m)
    throw ManifestError("height and width must be positive multiples of " + std::to_string(m) + " up to " +
                        std::to_string(kMaxImageSide) + ", got " + std::to_string(height) + "x" + std::to_string(width) +
                        ": e.g. --height " + std::to_string(latent.height));
  if (!latent.dynamic_resolution && (height != latent.height || width != latent.width))
    throw ManifestError("this export has a static size " + std::to_string(latent.height) + "x" + std::to_string(latent.width) +
                        ": drop --height/--width or re-export at " + std::to_string(height) + "x" + std::to_string(width));
  const int64_t h = height / latent.spatial_factor, w = width / latent.spatial_factor;
  std::vector<int64_t> shape;
  if (latent.layout == "BCHW") {
    shape = {batch, latent.channels, h, w};
  } else {
    const int64_t tf = latent.temporal_factor;
    if (frames < 1 || frames > kMaxFrames || (frames - 1) % tf)
      throw ManifestError("frames must be 1 + a multiple of " + std::to_string(tf) + " up to " + std::to_string(kMaxFrames) +
                          ", got " + std::to_string(frames));
    if (!latent.dynamic_frames && frames != latent.frames)
      throw ManifestError("this export has a static frame count " + std::to_string(latent.frames) + ": pass --frames " +
                          std::to_string(latent.frames));
    const int64_t f = (frames - 1) / tf + 1;
    shape = latent.layout == "BCFHW" ? std::vector<int64_t>{batch, latent.channels, f, h, w}
                                     : std::vector<int64_t>{batch, f, latent.channels, h, w};
  }
  // Each factor is bounded above, so the running product stays far from overflow before the check.
  int64_t elements = 1;
  for (int64_t d : shape) {
    if (d < 1) throw ManifestError("latent size " + std::to_string(d) + " is not positive");
    elements *= d;
    if (elements > kMaxLatentElements)
      throw ManifestError("the latents would hold over " + std::to_string(kMaxLatentElements) +
                          " values: lower --num-images, --height/--width or --frames");
  }
  return shape;
}

Manifest read_manifest(const std::string& export_dir) {
  std::ifstream file(export_dir + "/samg.json", std::ios::binary);
  if (!file) throw std::runtime_error(export_dir + " is not a samg export (no samg.json): run `samg export` first");
  std::stringstream text;
  text << file.rdbuf();
  Manifest m;
  try {
    m.raw = Json::parse(mark_non_finite(text.str()));
  } catch (const Json::parse_error& error) {
    std::string what = error.what();
    const size_t colon = what.find("syntax error");
    throw ManifestError("samg.json: not valid JSON (byte " + std::to_string(error.byte) + ", " +
                        (colon == std::string::npos ? what : what.substr(colon)) + "): " + kReexport);
  }
  const Json& root = m.raw;
  if (!root.is_object()) throw ManifestError("samg.json: the document must be a JSON object, got " + shown(root) + ": " + kReexport);
  if (!root.contains("format") || root["format"] != "samg-export")
    throw ManifestError("samg.json: format must be \"samg-export\", got " + (root.contains("format") ? shown(root["format"]) : "nothing") +
                        ": " + export_dir + " is not a samg export; " + kReexport);
  if (!root.contains("format_version") || root["format_version"] != 1)
    throw ManifestError("samg.json: format_version must be 1, got " +
                        (root.contains("format_version") ? shown(root["format_version"]) : "nothing") + ": " + kReexport);

  auto top_choice = [&](const char* key, std::initializer_list<const char*> allowed) -> std::string {
    std::string list;
    for (const char* a : allowed) {
      if (root.contains(key) && root[key].is_string() && root[key] == a) return a;
      list += std::string(list.empty() ? "" : ", ") + a;
    }
    fail(key, "must be one of " + list + ", got " + (root.contains(key) ? shown(root[key]) : "nothing"));
  };
  m.prediction_type = top_choice("prediction_type", {"epsilon", "v_prediction", "flow"});
  m.guidance = top_choice("guidance", {"fused", "raw", "scfg"});
  if (m.guidance == "scfg")
    fail("guidance", "is scfg, which the C++ runtime does not run", "sample S-CFG exports with `samg generate`");
  if (root.contains("dtype")) {
    const std::string dtype = top_choice("dtype", {"float32", "float16", "bfloat16"});
    if (dtype != "float32")
      fail("dtype", "is " + dtype + "; the C++ runtime runs float32 exports only", "re-export with --dtype float32");
  }

  if (root.contains("combine") && !root["combine"].is_null()) {
    const Section c(root, "combine");
    if (c.has("tau")) m.combine.tau = static_cast<float>(c.number("tau", -1e6, 1e6));
    if (c.has("sharpness")) m.combine.sharpness = static_cast<float>(c.number("sharpness", 0.0, 1e6));
    if (c.has("smooth")) {
      m.combine.smooth = static_cast<int>(c.integer("smooth", 0, 3));
      if (m.combine.smooth != 0 && m.combine.smooth != 3) fail(c.field("smooth"), "must be 0 or 3, got " + std::to_string(m.combine.smooth));
    }
    if (c.has("channel_axis")) m.combine.channel_axis = static_cast<int>(c.integer("channel_axis", 1, 2));
  }
  m.latent = read_latent(root);
  const int expected_axis = m.latent.layout == "BFCHW" ? 2 : 1;
  if (m.combine.channel_axis != expected_axis)
    fail("combine.channel_axis", "must be " + std::to_string(expected_axis) + " for layout " + m.latent.layout + ", got " +
                                     std::to_string(m.combine.channel_axis));
  m.scheduler = read_scheduler(root);
  if ((m.scheduler.kind == "flow") != (m.prediction_type == "flow"))
    fail("scheduler.kind", "is " + m.scheduler.kind + " but prediction_type is " + m.prediction_type +
                               " (flow models need a flow scheduler, and only they)");

  const Section vae(root, "vae");
  m.vae_path = vae.file("file", export_dir);
  m.vae_file = vae.string("file");
  if (vae.has("scaling_factor")) m.vae_scaling_factor = vae.number("scaling_factor", 0.0, 1e6, true);
  if (vae.has("shift_factor")) m.vae_shift_factor = vae.number("shift_factor", -1e6, 1e6);
  const Section denoiser(root, "denoiser");
  m.denoiser_path = denoiser.file("file", export_dir);
  m.denoiser_file = denoiser.string("file");

  // What the export wrote, by name; the loaded files are checked against it (samg/verify.h).
  const auto files = root.find("files");
  if (files == root.end() || !files->is_object()) fail("files", files == root.end() ? "is missing" : "must be an object, got " + shown(*files));
  for (const auto& [name, digest] : files->items()) {
    const std::string text = digest.is_string() ? digest.get<std::string>() : "";
    bool hex = text.size() == 7 + 64 && text.rfind("sha256:", 0) == 0;
    for (size_t i = 7; hex && i < text.size(); ++i) hex = std::isdigit(static_cast<unsigned char>(text[i])) || (text[i] >= 'a' && text[i] <= 'f');
    if (!hex) fail("files." + name, "must be \"sha256:\" and 64 lowercase hex digits, got " + shown(digest));
    m.file_hashes[name] = text;
  }

  const Section text_encoder(root, "text_encoder");
  const Json& outputs = text_encoder.at("outputs");
  if (!outputs.is_array() || outputs.empty() || outputs.size() > 16)
    fail("text_encoder.outputs", "must be a list of 1 to 16 input names, got " + shown(outputs));
  for (const Json& name : outputs) {
    // Names become file names (<name>.npy in --cond): plain identifiers only.
    const std::string text = name.is_string() ? name.get<std::string>() : "";
    bool plain = !text.empty() && text.size() <= 128;
    for (char ch : text) plain = plain && (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_');
    if (!plain) fail("text_encoder.outputs", "must hold plain input names (letters, digits, _), got " + shown(name));
    m.conditioning_names.push_back(text);
  }
  return m;
}

}  // namespace samg

// Checks the files the C++ runtime opens (the denoiser and VAE graphs, and their NAME.data external
// weights where present) against the sha256 hashes samg.json's `files` records at export, as the
// Python runtime does (samg/contract.py verify_files). A verified-stamp (.samg-verified.json,
// written by the Python side: per file name its size, mtime_ns and expected hash) spares
// re-hashing a file whose size and mtime have not changed since it last matched. The C++ side
// reads the stamp but never writes it, so a folder the Python side never verified is hashed on
// every load here.
#pragma once

#include <string>

#include "samg/manifest.h"

namespace samg {

constexpr const char* kVerifiedStamp = ".samg-verified.json";   // samg.contract.VERIFIED_STAMP
constexpr const char* kVerifiedFormat = "samg-verified";        // samg.contract.VERIFIED_FORMAT

// ManifestError (one line naming the file and the fix) for a loaded file that `files` does not
// list, that is missing, or whose content does not match its hash.
void verify_loaded_files(const Manifest& manifest, const std::string& export_dir);

}  // namespace samg

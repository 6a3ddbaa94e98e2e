#!/usr/bin/env bash
# Run on a machine with pip's network access, from anywhere, before a GPU run: downloads the wheels
# the GPU image lacks into benchmarks/gpu/.carry/whl (git-ignored; the `run` call names it in
# `carry`), then prints what would travel against the 64 MiB limit.
#
# The lent H200's image (python 3.12, torch 2.11+cu130, CuPy 14, nvidia-cuda-nvrtc/-runtime wheels,
# ml-dtypes, transformers, huggingface-hub, safetensors, pillow, regex, pytest) has no diffusers;
# diffusers' metadata also names importlib_metadata, which it imports only on Python < 3.8
# (diffusers/utils/import_utils.py), so it is not carried. TensorRT is not carried: TensorRT-RTX
# does not run on compute capability 9.0, and its library alone is over 64 MiB.
#
#   bash benchmarks/gpu/prepare_carry.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$HERE/.carry/whl"
LIMIT=$(( 64 * 1024 * 1024 ))
mkdir -p "$WHEELS"

# The versions this project is tested with (what `pip install -e ".[all]"` put here).
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
WANTED=("diffusers==$(version diffusers)")
# wheels this script carried before and no longer does (a stale one would be installed on the GPU host)
rm -f "$WHEELS"/importlib_metadata-*.whl
for requirement in "${WANTED[@]}"; do
  name="${requirement%%==*}"
  rm -f "$WHEELS/$name"-*.whl  # one version of each: two would stop the install there
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "$requirement"
done
ls -la "$WHEELS"

tree_bytes=$(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry_bytes=$(du -sb "$HERE/.carry" | cut -f1)
total=$(( tree_bytes + carry_bytes ))
echo "working tree ${tree_bytes} B + carried ${carry_bytes} B = ${total} B of the ${LIMIT} B limit"
if (( total > LIMIT )); then
  echo "prepare_carry.sh: over the limit: carry less" >&2
  exit 1
fi

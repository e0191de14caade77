#!/usr/bin/env bash
# Wheels that benchmarks/gpu_vs_llmcompressor.py needs on a GPU machine whose image has torch, transformers (5.17),
# peft and accelerate but no datasets / gguf / network. Downloads into .gpu/wheels (git-ignored), no dependencies
# resolved: the set below is what `import llmcompressor` + `oneshot` + SparseGPT/Wanda modifiers + the GGUF loader
# import at run time (measured in /work/venv-llmc with -X importtime), minus what the image has.
#
#   * datasets is NOT carried: llm-compressor imports it only for type names when oneshot gets a ready DataLoader;
#     the benchmark installs a stub module (see install_datasets_stub) when the real package is missing. pandas,
#     pyarrow, dill, multiprocess, xxhash, pillow, rich and auto-round are then not imported at all.
#   * binary wheels (pydantic-core) are fetched for CPython 3.11, 3.12 and 3.13 (the image's Python is not known).
#
# On the GPU machine (carry .gpu/wheels):
#   python -m pip install --no-deps --no-index --target .gpu/site .gpu/wheels/*.whl   # pip picks the matching ABI
# and the benchmark appends .gpu/site to sys.path (image packages keep precedence).
#
# Usage: bash benchmarks/gpu_wheels.sh [pip]      (default pip: .venv/bin/pip)
set -euo pipefail
PIP=${1:-.venv/bin/pip}
DEST=.gpu/wheels
mkdir -p "$DEST"
PURE=(
  "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "loguru==0.7.3" "pydantic==2.14.4"
  "annotated-types==0.8.0" "typing-inspection==0.4.5" "nvidia-ml-py==13.615.71" "gguf==0.19.0"
  "requests==2.34.2" "urllib3==2.8.0" "idna==3.20" "certifi==2026.10.19.post1"
)
"$PIP" download --quiet --only-binary=:all: --no-deps --dest "$DEST" --python-version 3.11 \
  --platform manylinux2014_x86_64 --platform any "${PURE[@]}" || \
  "$PIP" download --quiet --no-deps --dest "$DEST" "${PURE[@]}"
for py in 3.11 3.12 3.13; do
  "$PIP" download --quiet --only-binary=:all: --no-deps --dest "$DEST" --python-version "$py" \
    --platform manylinux2014_x86_64 "pydantic-core==2.50.5"
done
# charset-normalizer (for requests) also has a pure-Python wheel: take that one, it fits every Python.
"$PIP" download --quiet --only-binary=:all: --no-deps --dest "$DEST" --python-version 3.11 --implementation py \
  --abi none --platform any "charset-normalizer==3.5.3"
ls -la "$DEST"
du -ch "$DEST"/*.whl | tail -1

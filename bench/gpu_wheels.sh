#!/usr/bin/env bash
# Download, here, the wheels bench/gpu_check.sh needs on the GPU machine (Python 3.12, x86-64), into
# .whl/ (ignored by git). Its image has torch, transformers, peft, accelerate and
# sentence-transformers; speed also needs these.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  pydantic pydantic-core annotated-types typing-inspection trl datasets dill multiprocess json-repair \
  datasketch tenacity gguf jsonschema jsonschema-specifications referencing rpds-py
du -sh .whl

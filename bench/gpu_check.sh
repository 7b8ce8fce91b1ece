#!/usr/bin/env bash
# make gpu-check: the checks that need a GPU, in a few minutes, with nothing downloaded there.
#
# Run it on a GPU machine from the repository's root. Packages its image lacks travel as wheels in
# .whl/ (bench/gpu_wheels.sh downloads them here, for the device's Python); vLLM's wheel is too big
# to carry (hundreds of MB), so the vLLM test runs only where vLLM is installed and says so otherwise.
# Prints: the device, torch and CUDA, then the CUDA tests (SFT, DPO, contrastive steps on tiny models;
# vLLM with a LoRA adapter and schema-constrained output) and the CPU check of configs/paper.yaml.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:src || exit 1
else
  export PYTHONPATH=src
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices {torch.cuda.device_count()}, "
      f"bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
try:
    import vllm
    print(f"vllm {vllm.__version__}")
except ImportError:
    print("vllm: not installed (the vLLM test will skip and say so)")
PY
python3 -m pytest -q -p no:cacheprovider -rs -m "gpu or not slow" tests/gpu tests/unit/test_model_specs.py

#!/usr/bin/env bash
# One prepared check for a host with an NVIDIA GPU (~2-3 minutes, no TensorRT needed): the
# Triton kernels of runtimes/triton_kernels.py on CUDA against runtimes/reference.py in fp32
# and fp16 at gate-on 0/20/100% plus a spatially clustered 20% (FBS: density 0.2/0.5/1), timed
# against a dense cuDNN conv of the same shape through PyTorch (fp32 TF32 off / on, fp16), for
# several shapes; then the gated tiny model lowered for TensorRT's AOT plugins with every plugin
# launched as TensorRT launches it (PTX via the CUDA driver, no TensorRT), against PyTorch; then
# the three kernels compiled ahead of time (Triton's AOT compiler + a C harness built with nvcc)
# and run without Python. Prints one table per shape; exit 1 if
# anything is not exact. tools/gpu_check.py says what each column means.
#
#   bash tools/gpu_check.sh                 # 1x128x28x28, 8x128x28x28, 8x256x14x14, 32x64x56x56
#   GPU_CHECK_ARGS="--shapes 1x128x28x28 --repeats 50" bash tools/gpu_check.sh
#
# Run from a checkout with gate2deploy importable (pip install -e '.[test]'; triton comes with
# torch). PYTHON picks the interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"
aot=()
if command -v nvcc >/dev/null; then
    nvcc --version | tail -1
    aot=(--aot "${GPU_CHECK_AOT_DIR:-$(mktemp -d /tmp/gate2deploy-aot.XXXXXX)}")
else
    echo "nvcc not found: the AOT step is skipped"
fi
# shellcheck disable=SC2086
"$PY" tools/gpu_check.py --device cuda ${GPU_CHECK_ARGS:-} "${aot[@]}"

#!/usr/bin/env bash
# One prepared check for a host with an NVIDIA GPU (minutes, no TensorRT needed): the Triton
# kernels of runtimes/triton_kernels.py on CUDA against runtimes/reference.py in fp32 and fp16
# at gate-on 0/20/100% (FBS: density 0.2/0.5/1), timed against a dense cuDNN conv of the same
# shape through PyTorch, then CG's and PG's kernels compiled ahead of time (Triton's AOT
# compiler + a C harness built with nvcc) and run without Python. Prints one table; exit 1 if
# anything is not exact. tools/gpu_check.py says what each column means.
#
#   bash tools/gpu_check.sh                 # 128 ch, 28x28, 3x3, batch 1
#   GPU_CHECK_ARGS="--batch 8 --channels 256 --size 14" bash tools/gpu_check.sh
#
# Run from a checkout with gate2deploy installed (pip install -e '.[test]'; triton comes with
# it). Never run in the session that wrote it: no GPU was available there.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"
aot=()
if command -v nvcc >/dev/null; then
    nvcc --version | tail -1
    aot=(--aot "${GPU_CHECK_AOT_DIR:-$(mktemp -d /tmp/gate2deploy-aot.XXXXXX)}")
else
    echo "nvcc not found: the AOT step is skipped"
fi
# shellcheck disable=SC2086
python tools/gpu_check.py --device cuda ${GPU_CHECK_ARGS:-} "${aot[@]}"

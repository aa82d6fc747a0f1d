#!/usr/bin/env bash
# The native CPU kernels on THIS machine's x86 tier (issue 18): which tier it is (the CPU's
# flags), every kernel path the CPU supports forced and checked against runtimes/reference.py
# (tests/test_kernel_paths.py, plus the native op tests), then the layer benchmark
# (tools/bench_gated_ops.py: dense ONNX Runtime conv vs CGConv / PGConv / FBSConv, same thread
# count, the path that ran printed per row) and the CG ResNet-20 layer by layer
# (tools/bench_network_layers.py; LAYERS=0 skips it). Meant for a machine of a tier the development
# machine lacks (AVX-512 VNNI, AMX): speed figures count only for the tier that ran them.
#
#   bash tools/cpu_tier_check.sh                      # 2 threads, 15 repeats
#   THREADS=4 REPEATS=30 bash tools/cpu_tier_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo
echo "cores: $(nproc); tier flags: $(grep -m1 -o -w 'avx2\|avx512f\|avx512_vnni\|avx512_bf16\|amx_int8\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python -c "import onnxruntime, torch; print('onnxruntime', onnxruntime.__version__, 'torch', torch.__version__)"
status=0
python -m pytest -q -p no:cacheprovider tests/test_kernel_paths.py || status=1
# every native-kernel tier this CPU has, side by side (the widest is this tier's speed)
python tools/bench_gated_ops.py --tiers all --fractions 0,0.2,0.5,1 --repeats "${REPEATS:-15}" --threads "${THREADS:-2}" || status=1
# The CG ResNet-20 layer by layer on this tier (each gated node vs its dense twin, per stage).
if [ "${LAYERS:-1}" = 1 ]; then
    python tools/bench_network_layers.py --net cg --repeats 50 --threads 1 || status=1
fi
exit $status

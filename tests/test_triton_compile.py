"""The Triton kernels compiled for an H100/H200 (sm_90) here, without a GPU.

Triton's interpreter (tests/test_triton_ops.py) runs the kernels as numpy and accepts code
the real compiler rejects (tl.dot's shape and dtype rules, constexpr misuse, ...). Triton
compiles for a GPU target without a GPU, with its bundled ptxas, so each kernel is compiled
for sm_90 in its fp32 and fp16 signatures (runtimes.triton_kernels.kernel_signatures, the
same ones tools/gpu_check.py builds ahead of time), in a subprocess where TRITON_INTERPRET is
unset. Checked from the PTX: fp16 dots run on the tensor cores (mma), fp32 dots never use
TF32 (the 1e-4 relative contract), and no kernel takes an fp32 scalar argument (Triton >= 3.4's
AOT launcher passes those as C doubles; PG's scale is a pointer).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from gate2deploy.runtimes import triton_kernels as tk

out = {}
# (label, dtype, PG abits, pred_bits): fp16 PG at (14, 2) has levels beyond fp16's exact
# integers, so its parts are fp32 values and the dot is an ieee fp32 one
for label, dtype, abits, pred in (("fp32", "fp32", 8, 4), ("fp16", "fp16", 8, 4), ("fp16-float-parts", "fp16", 14, 2)):
    sigs = tk.kernel_signatures(dtype, abits=abits, pred_bits=pred)
    for name, sig in sigs.items():
        if label == "fp16-float-parts" and not name.startswith("_pg_"):
            continue
        fn = getattr(tk, name)
        src = triton.compiler.ASTSource(
            fn=fn, signature={a: v if isinstance(v, str) else "constexpr" for a, v in sig},
            constexprs={a: v for a, v in sig if not isinstance(v, str)})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        ptx = kernel.asm["ptx"]
        out[f"{name}/{label}"] = {"arg_names": fn.arg_names, "sig": [a for a, _ in sig],
                                  "cubin": len(kernel.asm["cubin"]), "mma": ptx.count("mma.sync") + ptx.count("wgmma"),
                                  "tf32": ptx.count("tf32"), "scalar_types": [v for _, v in sig if isinstance(v, str) and not v.startswith("*")]}
print(json.dumps(out))
"""


def _bundled_ptxas() -> Path | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - no usable Triton: nothing to compile
        return None
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return ptxas if ptxas.is_file() else None


@pytest.fixture(scope="module")
def compiled():
    if _bundled_ptxas() is None:
        pytest.skip("Triton's bundled ptxas is absent: cannot compile for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


CONV_KERNELS = ("_cg_conv_kernel", "_pg_conv_kernel", "_fbs_conv_kernel")
KERNELS = (*CONV_KERNELS, "_pg_split_kernel")  # PG's quantization: elementwise, no dot


def test_every_kernel_has_a_signature():
    from gate2deploy.runtimes import triton_kernels as tk

    if tk.triton is None:
        pytest.skip("Triton is not importable here")
    assert set(tk.kernel_signatures("fp32")) == set(KERNELS)
    assert {name for name in dir(tk) if name.startswith("_") and name.endswith("_kernel")} == set(KERNELS)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_for_sm90(compiled, kernel, dtype):
    info = compiled[f"{kernel}/{dtype}"]
    assert info["cubin"] > 0
    assert info["sig"] == info["arg_names"]  # the AOT signature lists every argument in order
    assert set(info["scalar_types"]) == {"i32"}  # no fp32 scalar argument
    if kernel not in CONV_KERNELS:
        assert info["mma"] == 0
    elif dtype == "fp16":
        assert info["mma"] > 0, "fp16 dots should run on the tensor cores"
    else:
        assert info["mma"] == 0 and info["tf32"] == 0, "fp32 dots must be IEEE fp32, never TF32"


@pytest.mark.parametrize("kernel", ["_pg_split_kernel", "_pg_conv_kernel"])
def test_pg_fp16_with_float_parts_compiles_for_sm90(compiled, kernel):
    """fp16 X whose levels do not fit fp16's exact integers (abits 14): PG's parts are float32
    values and its dots IEEE fp32 (no tensor cores, no TF32)."""
    info = compiled[f"{kernel}/fp16-float-parts"]
    assert info["cubin"] > 0 and info["sig"] == info["arg_names"]
    assert info["mma"] == 0 and info["tf32"] == 0

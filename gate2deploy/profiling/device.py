"""Which device a latency table is true for: the CPU model, its ISA tiers, and the GPU.

A LUT records, beside host name, CPU model and core count (measure.machine_info), the ISA
tiers that decide which kernels run and the GPU:

* `isa`: the tiers present, widest first, from the CPU flags: "amx" (AMX int8 tiles, which
  the native PGConv uses), "avx512_vnni" (the native kernels' widest vector build),
  "avx512" (MLAS's 16-channel NCHWc blocks), "avx2" (8-channel blocks, the AVX2 build).
  Where /proc/cpuinfo is missing the list is empty.
* `gpu`: torch.cuda's name of device 0, or None.

Comparing devices (`differences`). Two machines are the same device for a LUT when the CPU
model and ISA tiers agree (CPU targets) or the GPU agrees (TensorRT). The host name and core
count are not compared: a fleet has many hosts of one kind, and the measured thread count is
recorded separately. Fields an older LUT lacks are not compared.
"""
from __future__ import annotations

ISA_TIERS = (  # (tier, flags that must all be present), widest first
    ("amx", ("amx_tile", "amx_int8")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    ("avx512", ("avx512f",)),
    ("avx2", ("avx2", "fma")),
)


def isa_tiers(flags: frozenset[str] | None = None) -> list[str]:
    if flags is None:
        from ..passes.choose_widths import cpu_flags

        flags = cpu_flags()
    return [tier for tier, needs in ISA_TIERS if all(f in flags for f in needs)]


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no usable GPU" here
        return None


def identity() -> dict:
    """This machine's ISA tiers and GPU (merged into measure.machine_info)."""
    return {"isa": isa_tiers(), "gpu": gpu_name()}


def differences(recorded: dict, here: dict, target: str) -> list[str]:
    """What differs between the device a LUT was measured on and `here` (both machine_info
    dicts), as 'field X vs Y' phrases; empty when they are the same device."""
    from ..targets import canonical_name

    fields = ("gpu",) if canonical_name(target) == "trt" else ("cpu", "isa")
    out = []
    for name in fields:
        if name in recorded and recorded.get(name) != here.get(name):
            out.append(f"{name} {_show(recorded.get(name))} vs {_show(here.get(name))} here")
    return out


def _show(value) -> str:
    if isinstance(value, list):
        return "+".join(value) or "none"
    return repr(value) if value is not None else "none"

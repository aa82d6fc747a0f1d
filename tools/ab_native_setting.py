#!/usr/bin/env python
"""Two or more values of a native-library setting compared in ONE session, switched run by run
(issue 18: a kernel variant worth a few percent at 2 threads).

Between processes (`bench_gated_ops.py --isolated`) this 2-vCPU machine spreads ~10-20% per
figure at 2 threads, more than most kernel changes are worth; within one process, two
sessions' thread pools compete for the cores. Here one session of the CG or PG ResNet-20
(tools/bench_gated_ops.py's networks, or one gated layer of it with `--layer`) runs every
value of `--setting NAME=A,B,...` (runtimes/native: G2DSetSetting: `split_spans` or `cg_pool`,
auto / always / never) in each round, in time_paired's rotating order, each timed run after `--warm`
untimed ones (gate2deploy.benchmark.time_paired); the speed-ups are medians of per-round ratios
against the first value, the thread pool and the caches the same for all. The largest output
difference between the values is printed too (a setting that changes a summation order may
change the last bits; the tests compare each path with the reference).

    python tools/ab_native_setting.py --setting split_spans=never,auto --threads 1,2
    python tools/ab_native_setting.py --setting split_spans=never,auto --threads 2 --layer 7
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gated_ops as nets  # noqa: E402  (the networks and their export)

from gate2deploy.benchmark import paired_ratio, time_paired  # noqa: E402
from gate2deploy.kernel_choice import _gated_inputs, _single_node  # noqa: E402
from gate2deploy.runtimes.ort import custom_ops_library_path  # noqa: E402


class SettingSession:
    """`session` with the native setting `name` switched to `value` before each run."""

    def __init__(self, lib, session, name: str, value: str):
        self.lib, self.session, self.name, self.value = lib, session, name.encode(), value.encode()

    def run(self, outputs, feed):
        if self.lib.G2DSetSetting(self.name, self.value) != 0:
            raise SystemExit(f"error: the native library has no setting {self.name.decode()}="
                             f"{self.value.decode()}")
        return self.session.run(outputs, feed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", required=True, help="NAME=A,B,...: the values to compare (the first is the baseline)")
    p.add_argument("--net", choices=["cg", "pg"], default="cg")
    p.add_argument("--layer", type=int, default=None, help="time this gated layer alone (index among the gated nodes)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    p.add_argument("--points", default="0,2,7",
                   help="indices into bench_gated_ops' threshold offsets (gate-on fractions)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--warm", type=int, default=2, help="untimed runs before each timed one")
    args = p.parse_args(argv)
    name, _, values = args.setting.partition("=")
    values = values.split(",")
    if not name or len(values) < 2:
        p.error("--setting takes NAME=A,B[,...] (two values at least)")

    import torch

    from gate2deploy.models.dnn_gating import resnet20_cg, resnet20_pg

    lib = ctypes.CDLL(str(custom_ops_library_path()))  # the handle ONNX Runtime loads too
    lib.G2DKernelConfig.restype = ctypes.c_char_p
    lib.G2DSetSetting.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    for value in values:  # refuse an unknown name or value before anything is timed
        if lib.G2DSetSetting(name.encode(), value.encode()) != 0:
            p.error(f"the native library has no setting {name}={value}")
    lib.G2DSetSetting(name.encode(), values[0].encode())  # the configuration printed: the baseline's
    torch.manual_seed(0)  # the same weights as bench_gated_ops' networks
    base = (resnet20_cg(partitions=4, shuffle=False) if args.net == "cg"
            else resnet20_pg(wbits=8, abits=3, pred_bits=2)).eval()
    offsets = nets.CG_OFFSETS if args.net == "cg" else nets.PG_OFFSETS
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"native kernels: {lib.G2DKernelConfig().decode()}")
    what = f"layer {args.layer}" if args.layer is not None else "network"
    print(f"ResNet-20 {args.net.upper()} {what}, batch {args.batch}: one session per thread count and point, "
          f"{name} switched run by run, {args.rounds} rounds; us, speed-ups vs {name}={values[0]} "
          f"(medians of per-round ratios)")
    for index in [int(i) for i in args.points.split(",")]:
        model = nets.with_threshold_offset(base, offsets[index])
        ort_model, _ = nets.export_both(model, x)
        frac, _ = nets.gate_figures(model, x, ort_model)
        feed = {ort_model.graph.input[0].name: x.numpy()}
        if args.layer is not None:
            op = "CGConv" if args.net == "cg" else "PGConv"
            nodes = [n for n in ort_model.graph.node if n.op_type == op]
            node = nodes[args.layer]
            feed = {node.input[0]: _gated_inputs(ort_model, nodes, x.numpy(), 1)[node.input[0]]}
            ort_model = _single_node(ort_model, node, feed)
        for threads in [int(t) for t in args.threads.split(",")]:
            session = nets.custom_session(ort_model, threads)
            variants = {v: SettingSession(lib, session, name, v) for v in values}
            outputs = {v: s.run(None, feed)[0] for v, s in variants.items()}
            diff = max(float(np.max(np.abs(outputs[v] - outputs[values[0]]))) for v in values)
            times = time_paired(variants, {v: [feed] for v in values}, rounds=args.rounds, warm=args.warm)
            cells = [f"{v}: {statistics.median(times[v]) * 1e3:8.1f}"
                     + ("" if v == values[0] else f" ({paired_ratio(times, values[0], v):.3f}x)") for v in values]
            print(f"  net on {100 * frac:5.1f}%  {threads} thread(s)  " + "  ".join(cells) + f"  max|d| {diff:.1e}",
                  flush=True)
    lib.G2DSetSetting(name.encode(), values[0].encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

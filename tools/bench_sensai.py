#!/usr/bin/env python
"""Benchmark of the sensAI export (issue 16): 10 class groups of a CIFAR VGG-19-BN-style and
a CIFAR bottleneck-ResNet-style model (CIFAR-100, 10 classes per group, each group pruned to
its own widths as prune_and_get_model.py does; random candidates stand in for APoZ ones),
batch 1 (--batch 1 8 for both), ONNX Runtime CPU, the same thread count everywhere:

- fused:      equal-structure groups fused into grouped convolutions (padded to the widest);
- hybrid:     fused, with the layers that time faster per group split back into the groups'
              own convolutions (importers/sensai.py hybridize; per-layer timing as the export);
- padded:     the N group models as parallel branches, each one's widths rounded up to
              whole NCHWc blocks (importers/sensai.py: pruned widths run im2col otherwise);
- branches:   the same N group models as parallel branches of one ONNX graph (ONNX
              Runtime's default sequential execution);
- sequential: the N group models as N ONNX models run one after another (plus the
              combination in numpy), as sensAI's evaluate.py runs them.
The export's default (--sensai-form auto) keeps the fastest of fused / hybrid / padded / branches,
timed the same way; the "chosen" line is that choice on this run's figures. The same forms
and the sequential group models are also exported for --target ort (the native library;
`--stream-convs` as given, default auto: the big-weight small-map convs as StreamConv where
the export measures that faster) and timed in the same blocks ("<form> ort"; --stream-convs
skip leaves them out).

Beside the goals, the machine's peak multiply-add rate (large dense convs, timed in the same
blocks) and the ceiling it puts on any form: the groups' MACs at that rate; and a roofline
ceiling that also counts memory: each conv of the group models takes at least its MACs at
the peak rate or its weights read at the machine's read bandwidth (the faster of a ReduceSum
over 256 MiB and a 1x1 conv reading 256 MiB of weights, timed in the same blocks), whichever
is longer; the same roofline for the fused model's own (padded) convolutions, and how close
the fused form ran to it.

Every model goes through gate2deploy.compile (target onnx, verified). Timing: alternating
blocks, medians (minima in brackets; gate2deploy/benchmark.py). Also checks that every
form's output equals the seed's combination of the group models' own outputs (1e-5).

    python tools/bench_sensai.py [--repeats 30] [--threads 2] [--batch 1 8] [--spinning both]
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import gate2deploy  # noqa: E402
from gate2deploy.benchmark import time_sessions  # noqa: E402
from gate2deploy.importers.sensai import grouped_model  # noqa: E402
from gate2deploy.verify import make_session  # noqa: E402

GROUPS = [list(range(10 * g, 10 * g + 10)) for g in range(10)]


class Sequential:
    """N sessions run one after another, then sensAI's combination in numpy."""

    def __init__(self, sessions, groups):
        self.sessions = sessions
        perm = [c for g in groups for c in g]
        self.order = np.argsort(perm)

    def run(self, _, feed):
        outs = []
        for s in self.sessions:
            z = s.run(None, feed)[0]
            e = np.exp(z - z.max(axis=1, keepdims=True))
            outs.append((e / e.sum(axis=1, keepdims=True))[:, 1:])
        return [np.concatenate(outs, axis=1)[:, self.order]]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown CPU"


FORMS = ("fused", "hybrid", "padded", "branches")


def peak_sessions(threads: int) -> tuple[dict, dict, dict]:
    """Sessions that measure the best multiply-add rate ONNX Runtime reaches on this machine at
    `threads` threads: large 3x3 convolutions alone (MLAS's NCHWc kernels at their most
    efficient, no per-op overhead to speak of). Timed in the same alternating blocks as the
    forms (this machine's speed changes by up to 2x within minutes when its neighbours are
    busy), the fastest shape's rate is the peak: no form of the grouped model can run its
    multiply-adds faster, so the groups' MACs / peak is a floor on any form's time and
    sequential ms / that floor a ceiling on its speed-up (printed beside the goals: issue 16).
    An estimate: the peak is these shapes' rate at batch 1, which another shape or batch
    might exceed a little.
    Returns (sessions, feeds, MACs per run), keyed "peak <shape>"."""
    from bench_gated_ops import node_model  # the one-node models of the layer benchmark

    rng = np.random.default_rng(0)
    sessions, feeds, macs = {}, {}, {}
    for c, side in [(256, 32), (128, 32), (256, 16)]:  # (channels in = out, side)
        w = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
        model = node_model("Conv", "", (1, c, side, side), [w], {"pads": [1, 1, 1, 1]})
        key = f"peak 3x3 conv {c} ch {side}x{side}"
        sessions[key] = make_session(model, threads=threads)
        feeds[key] = [{"x": rng.standard_normal((1, c, side, side)).astype(np.float32)}]
        macs[key] = c * c * 9 * side * side
    return sessions, feeds, macs


# 256 MiB, about the VGG groups' weights (223-272 MB): past the private caches, but not past
# every last-level cache (Intel Emerald Rapids: 300 MiB of L3, shared). The probe then reads
# partly from L3 as the model's weights do, so the floor stays a floor (a DRAM-only figure
# would be lower bandwidth and overstate it); layers timed alone keep their weights in L3.
STREAM_FLOATS = 64 * 2**20


def stream_sessions(threads: int) -> tuple[dict, dict]:
    """Sessions that read STREAM_FLOATS floats once per run, ONNX Runtime's read bandwidth from
    memory, timed in the same blocks as the forms: a ReduceSum of an input (an input, not a
    constant, which ONNX Runtime would fold away) and a 1x1 Conv on one pixel whose weights
    are that size (how the late layers' weights are read at batch 1: each weight once or a
    few times). The faster one is the bandwidth: on an Intel Xeon (2 vCPU) the ReduceSum read
    10.6 GB/s while the fused VGG read its 272 MB of weights in 17 ms (16 GB/s), so one probe
    alone can understate the machine and overstate the floor. Returns (sessions, feeds)."""
    from onnx import TensorProto, helper, numpy_helper

    def model_of(nodes, inputs, inits=()):
        graph = helper.make_graph(nodes, "stream", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=list(inits))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    reduce_model = model_of([helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
                            [helper.make_tensor_value_info("big", TensorProto.FLOAT, [STREAM_FLOATS])])
    cin = 4096
    w = np.full((STREAM_FLOATS // cin, cin, 1, 1), 1e-3, np.float32)
    conv_model = model_of([helper.make_node("Conv", ["x", "w"], ["y"])],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 1, 1])],
                          [numpy_helper.from_array(w, "w")])
    sessions = {"stream ReduceSum": make_session(reduce_model, threads=threads),
                "stream 1x1 Conv weights": make_session(conv_model, threads=threads)}
    feeds = {"stream ReduceSum": [{"big": np.ones(STREAM_FLOATS, np.float32)}],
             "stream 1x1 Conv weights": [{"x": np.ones((1, cin, 1, 1), np.float32)}]}
    return sessions, feeds


def conv_roofline(model, example_shape) -> list[tuple[int, int]]:
    """(MACs, weight bytes) of every Conv of an ONNX model at input shape `example_shape`
    (shape inference gives each output's size)."""
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    for d, n in zip(model.graph.input[0].type.tensor_type.shape.dim, example_shape):
        d.dim_value = int(n)  # a concrete batch: the exported batch dimension is symbolic
    m = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.value_info) + list(m.graph.output)}
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = []
    for node in m.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        y = dims.get(node.output[0])
        if not y or any(d <= 0 for d in y):
            continue
        macs = int(np.prod(y)) * int(np.prod(w.shape[1:]))  # N*O*OH*OW * (C/group)*kh*kw
        out.append((macs, int(w.nbytes)))
    return out


def bench(name, models, threads, repeats, batches, spin_modes, stream="auto"):
    example = torch.randn(1, 3, 32, 32)
    built = {form: grouped_model(models, GROUPS, example, form=form, threads=threads) for form in FORMS}
    assert built["fused"].plan["fused"] == [list(range(10))], built["fused"].plan
    split = built["hybrid"].plan["hybrid_split_layers"]
    print(f"{name}: hybrid form splits {len(split)} layer(s) per group"
          + (f" ({', '.join(split)})" if split else " (none faster per group: hybrid = fused)"))
    for batch in batches:
        x_t = torch.randn(batch, 3, 32, 32)
        compiled = {form: gate2deploy.compile(m, x_t, target="onnx") for form, m in built.items()
                    if form != "hybrid" or split}
        singles = [gate2deploy.compile(m, x_t, target="onnx").onnx_model for m in models]
        # The same forms for --target ort (the native library: convs whose weights dwarf
        # their output as StreamConv, passes/stream_weight_convs.py), and the group models so
        # exported run one after another.
        on_ort = {form: gate2deploy.compile(m, x_t, target="ort", stream_convs=stream)
                  for form, m in built.items() if form != "hybrid" or split} if stream != "skip" else {}
        singles_ort = [gate2deploy.compile(m, x_t, target="ort", stream_convs=stream).onnx_model
                       for m in models] if on_ort else []
        macs = {form: c.report["macs_after"] for form, c in compiled.items()}
        x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        sessions = {}
        for spin in spin_modes:
            tag = "" if spin else "-nospin"
            for form, c in compiled.items():
                sessions[form + tag] = make_session(c.onnx_model, threads=threads, spinning=spin)
            for form, c in on_ort.items():
                sessions[form + " ort" + tag] = make_session(c.onnx_model, threads=threads, spinning=spin)
            sessions["sequential" + tag] = Sequential([make_session(m, threads=threads, spinning=spin)
                                                       for m in singles], GROUPS)
            if singles_ort:
                sessions["sequential ort" + tag] = Sequential([make_session(m, threads=threads, spinning=spin)
                                                               for m in singles_ort], GROUPS)
        outs = {k: s.run(None, {"input": x})[0] for k, s in sessions.items()}
        # the seed's combination of the group models' own outputs (Sequential) is the reference
        ref = outs["sequential" + ("" if spin_modes[0] else "-nospin")]
        err = max(float(np.abs(o - ref).max()) for o in outs.values())
        assert err <= 1e-5, f"outputs differ from the seed combination by {err:.1e}"
        feeds = {k: [{"input": x}] for k in sessions}
        peak_s, peak_feeds, peak_macs = peak_sessions(threads)
        stream_s, stream_feeds = stream_sessions(threads)
        peak_s.update(stream_s)
        peak_feeds.update(stream_feeds)
        times = time_sessions({**sessions, **peak_s}, {**feeds, **peak_feeds}, runs=repeats)
        med = {k: statistics.median(t) for k, t in times.items()}
        low = {k: min(t) for k, t in times.items()}
        rates = {k: peak_macs[k] / med[k] / 1e6 for k in peak_s if k not in stream_s}  # GMAC/s (times in ms)
        reads = {k[7:]: STREAM_FLOATS * 4 / med[k] / 1e6 for k in stream_s}  # GB/s
        bandwidth = max(reads.values())
        peak_key = max(rates, key=rates.get)
        peak = rates[peak_key]
        print(f"  batch {batch}: MACs " + ", ".join(f"{f} {v / 1e6:.0f} M" for f, v in macs.items())
              + f"; max |any form - seed combination| {err:.1e}")
        print(f"    machine peak in this run: {peak:.1f} GMAC/s ({peak_key[5:]}, {threads} threads, "
              f"median; the shapes: {', '.join(f'{r:.1f}' for r in rates.values())}); "
              f"read bandwidth {bandwidth:.1f} GB/s (the faster of reading {STREAM_FLOATS * 4 >> 20} MiB by "
              + ", ".join(f"{k} {v:.1f}" for k, v in reads.items()) + ")")
        # The roofline floor of the groups' own convolutions (the branches form: no padding):
        # each conv takes at least its MACs at the peak rate and at least its weights read from
        # memory once per run (at batch 1 the late layers' weights, used for 4 or 16 output
        # pixels, are far larger than the last-level cache: sensAI's VGG group models hold
        # ~220 MB of conv weights, read on every inference however the groups are arranged).
        roof = conv_roofline(compiled["branches"].onnx_model, x.shape)
        roof_ms = sum(max(m / (peak * 1e6), b / (bandwidth * 1e6)) for m, b in roof)
        wbytes = sum(b for _, b in roof)
        # The same floor for the fused model's own (padded) convolutions: what fusing can
        # reach at best once its padding (each group's widths rounded up to whole NCHWc
        # blocks, then to the widest group) is paid for.
        roof_fused = conv_roofline(compiled["fused"].onnx_model, x.shape)
        roof_fused_ms = sum(max(m / (peak * 1e6), b / (bandwidth * 1e6)) for m, b in roof_fused)
        wbytes_fused = sum(b for _, b in roof_fused)
        for spin in spin_modes:
            tag = "" if spin else "-nospin"
            forms = [f for f in FORMS if f in compiled]
            chosen = min(forms, key=lambda f: med[f + tag])
            c, seq, br = med[chosen + tag], med["sequential" + tag], med["branches" + tag]
            print(f"    {'spinning (default)' if spin else 'no spinning':18s} median (min) ms: "
                  + " | ".join(f"{k} {med[k + tag]:.2f} ({low[k + tag]:.2f})" for k in ["sequential", *forms]))
            print(f"      chosen (fastest, as the export's auto form picks): {chosen}; sequential/{chosen} "
                  f"{seq / c:.2f}x (goal >= 2), branches/{chosen} {br / c:.2f}x (goal >= 1.3); "
                  f"sequential/fused {seq / med['fused' + tag]:.2f}x, branches/fused {br / med['fused' + tag]:.2f}x")
            # The ceiling: the group models' own MACs (no padding; the report counts the whole
            # batch) at the machine's peak rate.
            floor_ms = macs["branches"] / (peak * 1e6)
            print(f"      estimated ceiling at this machine's peak ({peak:.1f} GMAC/s): the groups' {macs['branches'] / 1e6:.0f} M "
                  f"MACs take >= {floor_ms:.2f} ms, so sequential/any form <= {seq / floor_ms:.2f}x "
                  f"(goal 2: {'reachable' if seq / floor_ms >= 2 else 'NOT reachable here'}), branches/any "
                  f"form <= {br / floor_ms:.2f}x (goal 1.3: {'reachable' if br / floor_ms >= 1.3 else 'NOT reachable here'}); "
                  f"sequential ran at {macs['branches'] / (seq * 1e6):.1f} GMAC/s")
            print(f"      roofline ceiling (each conv: max(MACs at peak, its weights at {bandwidth:.1f} GB/s); "
                  f"{wbytes / 1e6:.0f} MB of conv weights): >= {roof_ms:.2f} ms, so sequential/any form <= "
                  f"{seq / roof_ms:.2f}x (goal 2: {'reachable' if seq / roof_ms >= 2 else 'NOT reachable here'}), "
                  f"branches/any form <= {br / roof_ms:.2f}x")
            if on_ort:
                ort_forms = [f for f in forms if f in on_ort]
                kept = min(ort_forms, key=lambda f: med[f + " ort" + tag])
                streamed = {f: sum(n.op_type == "StreamConv" for n in on_ort[f].onnx_model.graph.node)
                            for f in ort_forms}  # kept (auto keeps them only where measured faster)
                k = med[kept + " ort" + tag]
                print(f"      --target ort (--stream-convs {stream}; StreamConv nodes: "
                      + ", ".join(f"{f} {n}" for f, n in streamed.items()) + "): "
                      + " | ".join(f"{f} {med[f + ' ort' + tag]:.2f} ({low[f + ' ort' + tag]:.2f})" for f in ort_forms)
                      + f" | sequential ort {med['sequential ort' + tag]:.2f}")
                print(f"      fastest on ort: {kept}; sequential/{kept} {seq / k:.2f}x (goal >= 2), branches/{kept} "
                      f"{br / k:.2f}x (goal >= 1.3), against the onnx forms above; sequential ort/{kept} "
                      f"{med['sequential ort' + tag] / k:.2f}x, branches ort/{kept} {med['branches ort' + tag] / k:.2f}x")
            print(f"      fused form's own convs ({wbytes_fused / 1e6:.0f} MB of padded weights, "
                  f"{macs['fused'] / macs['branches']:.2f}x the groups' MACs): roofline >= {roof_fused_ms:.2f} ms, "
                  f"so sequential/fused <= {seq / roof_fused_ms:.2f}x; fused ran at {roof_fused_ms / med['fused' + tag]:.0%} "
                  f"of its roofline")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per configuration, in blocks of 10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (e.g. 1 8)")
    ap.add_argument("--spinning", choices=("on", "off", "both"), default="both",
                    help="ONNX Runtime's intra-op spinning (default on); both: every configuration both ways")
    ap.add_argument("--resnet-depth", type=int, default=56, help="bottleneck ResNet depth 9n+2 (seed: 110, 164)")
    ap.add_argument("--spread", type=float, default=0.05,
                    help="group models pruned per layer 30-70%% +- this per group (how far the groups' widths "
                         "differ, which the fused model pads); negative: each group 0-40%% at random")
    ap.add_argument("--stream-convs", choices=("auto", "on", "off", "skip"), default="auto",
                    help="the --target ort forms' --stream-convs (skip: time the onnx forms only)")
    args = ap.parse_args()
    from models.sensai_nets import CFG_E, group_models

    torch.set_num_threads(1)  # PyTorch only builds and checks the models here
    spin_modes = {"on": [True], "off": [False], "both": [True, False]}[args.spinning]
    print(f"CPU: {cpu_name()}; ONNX Runtime threads {args.threads}; batch {args.batch}; 10 groups x 10 classes")
    spread = None if args.spread < 0 else args.spread
    print(f"pruning: {'uniform 0-40% per group and layer' if spread is None else f'per layer 30-70%, +-{spread:.0%} per group'}")
    bench("VGG-19-BN", group_models("vgg", GROUPS, 100, seed=1, layer_spread=spread, cfg=CFG_E),
          args.threads, args.repeats, args.batch, spin_modes, args.stream_convs)
    bench(f"ResNet-{args.resnet_depth} (bottleneck)",
          group_models("resnet", GROUPS, 100, seed=2, layer_spread=spread, depth=args.resnet_depth),
          args.threads, args.repeats, args.batch, spin_modes, args.stream_convs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

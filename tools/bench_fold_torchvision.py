"""Fold benchmark on torchvision classification models (issue 3).

Per model: random 50% channel masks on every BatchNorm output (or its equivalent: conv
outputs in SqueezeNet, the hidden MLP width in ConvNeXt, the hidden Linear widths of VGG's
and MobileNetV3's classifiers), made consistent inside coupled
channel groups the way a pruner's masks are (one random bit per group, drawn with the
channel analysis), then captured, folded (with physical width padding,
passes/choose_widths.py) and timed with ONNX Runtime against the dense (unmasked) model.

Three folds per model: `exact` (no padding), `fast` (the default widths, the model the
quotient columns describe) and `measured` (widths timed per layer on this machine,
gate2deploy/measure_widths.py, cached under $GATE2DEPLOY_CACHE; its compile seconds include
the timing on a cold cache).

Columns: MACs kept (fold without padding / dense: what the masks leave), physical MACs
(the fast-folded model / dense, padding included), latency ratio (ORT CPU, 2 threads,
batch 1, ORT's default threading, the dense, exact, fast and measured sessions timed in
alternating blocks in one run, medians; gate2deploy/benchmark.py says why blocks; the ratio
of the fastest runs is printed too), the quotient latency ratio / physical MACs ratio, the
floor quotient and the kernel-time quotient from ONNX Runtime's profiler in the same run
(gate2deploy/kernel_floor.py defines both: the floor is the latency ratio if every op kind's
dense kernel time shrank exactly with its own work), the goal (issue 18: quotient <= 1.10,
or within 0.05 of the floor quotient), latency ratio / MACs kept (stricter: padding counted
as waste), the latencies of exact / fast / measured side by side with measured / fast
(issue 18: measured must not be slower than fast on any model) and what the measured
chooser did, compile time excluding verification (capture + passes), and the equality
error (max |ORT(folded) - masked PyTorch| / max |masked PyTorch|, worst of the three folds).

    python tools/bench_fold_torchvision.py                 # every model, 224x224 (299 Inception)
    python tools/bench_fold_torchvision.py resnet50 vgg11_bn --runs 50

The model zoo and mask placement below are also used by tests/test_torchvision_fold.py.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision.models as tvm
from torch import nn

from gate2deploy.benchmark import latencies_ms, whole_blocks
from gate2deploy.kernel_floor import floor_ratio, kernel_ms_by_kind, work
from gate2deploy.capture import capture
from gate2deploy.nn import MaskSpec, attach_masks, channel_mask
from gate2deploy.measure_widths import cpu_name, fold_measured
from gate2deploy.passes import ir
from gate2deploy.passes.channel_analysis import analyze
from gate2deploy.pipeline import FOLD_PIPELINE, PassContext, run_pipeline
from gate2deploy.report import model_cost


class LastAxisMask(nn.Module):
    """A channel mask over the last axis (channels-last MLPs such as ConvNeXt's blocks),
    expressed with the one exportable mask op through a transpose pair."""

    def __init__(self, mask: torch.Tensor, source: str):
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.source = source

    def forward(self, x):
        return channel_mask(x.permute(0, 3, 1, 2), self.mask, self.source).permute(0, 2, 3, 1)


@dataclass
class Case:
    name: str
    build: callable  # () -> nn.Module with random weights
    test_size: int  # smallest convenient input side for the equality tests
    bench_size: int = 224
    small_head: bool = False  # tests may shrink VGG's 25088x4096 classifier (`build_model`)


def _conv_outputs_except_classifier(model: nn.Module) -> list[str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[:-1]  # the last conv produces the logits (a graph output)


def _hidden_classifier_linears(model: nn.Module) -> list[str]:
    """Linear layers of a `classifier` head other than the last (VGG's and MobileNetV3's
    hidden widths, which have no BatchNorm but are pruned like any layer)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in linears[:-1] if n.startswith("classifier.")]


def mask_sites(name: str, model: nn.Module) -> list[str]:
    """Modules whose outputs get a channel mask: every BatchNorm (or equivalent)."""
    if name.startswith("squeezenet"):
        return _conv_outputs_except_classifier(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return bns + _hidden_classifier_linears(model)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("resnet18", lambda: tvm.resnet18(), 64),
    Case("resnet50", lambda: tvm.resnet50(), 64),
    Case("resnext50_32x4d", lambda: tvm.resnext50_32x4d(), 64),
    Case("wide_resnet50_2", lambda: tvm.wide_resnet50_2(), 32),
    Case("vgg11_bn", lambda: tvm.vgg11_bn(), 224, small_head=True),  # adaptive 7x7 pool needs 224
    Case("mobilenet_v2", lambda: tvm.mobilenet_v2(), 64),
    Case("mobilenet_v3_large", lambda: tvm.mobilenet_v3_large(), 64),
    Case("efficientnet_b0", lambda: tvm.efficientnet_b0(), 64),
    Case("densenet121", lambda: tvm.densenet121(), 64),
    Case("shufflenet_v2_x1_0", lambda: tvm.shufflenet_v2_x1_0(), 64),
    Case("regnet_y_400mf", lambda: tvm.regnet_y_400mf(), 64),
    Case("convnext_tiny", lambda: tvm.convnext_tiny(), 64),
    Case("googlenet", lambda: tvm.googlenet(aux_logits=False, init_weights=True), 64),
    Case("inception_v3", lambda: tvm.inception_v3(aux_logits=False, init_weights=True), 75, 299),
    Case("squeezenet1_0", lambda: tvm.squeezenet1_0(), 64),
    Case("mnasnet1_0", lambda: tvm.mnasnet1_0(), 64),
]}


def build_model(name: str, seed: int = 0, small_head: bool = False) -> nn.Module:
    """torchvision's definition with random weights; `small_head` swaps VGG's classifier
    widths (4096) for 256 so that the tests do not spend their time slicing 400 MB."""
    torch.manual_seed(seed)
    model = CASES[name].build().eval()
    if small_head and CASES[name].small_head:
        model.classifier[0] = nn.Linear(model.classifier[0].in_features, 256)
        model.classifier[3] = nn.Linear(256, 256)
        model.classifier[6] = nn.Linear(256, 10)
    # Random BN statistics so that folded BNs are not the identity and masked constants
    # (beta != 0 channels) are exercised.
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _convnext_hidden_masks(model: nn.Module, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """ConvNeXt blocks are channels-last MLPs with LayerNorm: mask the hidden width (the GELU
    output), which is what prunes the MLP."""
    masks = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "CNBlock":
            gelu_index = next(i for i, sub in enumerate(m.block) if isinstance(sub, nn.GELU))
            hidden = m.block[gelu_index - 1].out_features
            mask = torch.from_numpy(rng.random(hidden) < 0.5).float()
            label = f"{name}.block.{gelu_index}"
            m.block[gelu_index] = nn.Sequential(nn.GELU(), LastAxisMask(mask, label))
            masks[label] = mask
    return masks


@dataclass
class Prepared:
    model: nn.Module  # the masked PyTorch model (hooks attached)
    proto: onnx.ModelProto  # its capture
    capture_s: float
    n_masks: int


def prepare(name: str, size: int, seed: int = 0, coupled: bool = True, small_head: bool = False) -> Prepared:
    """Build `name` with random weights and random 50% masks, capture it.

    coupled=True makes the masks agree inside each coupled channel group (one random bit
    per group, as a pruner would); coupled=False leaves them independent, so that masks
    which disagree inside a group must be reported and kept."""
    model = build_model(name, seed, small_head)
    rng = np.random.default_rng(seed)
    specs = [MaskSpec(site, "out", torch.from_numpy(rng.random(_out_channels(model, site)) < 0.5).float(),
                      f"mask {site}") for site in mask_sites(name, model)]
    extra = _convnext_hidden_masks(model, rng) if name.startswith("convnext") else {}
    handles = attach_masks(model, specs)
    example = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    proto = capture(model, example)
    capture_s = time.perf_counter() - t0
    if coupled:
        by_source = _coupled_masks(proto, rng)
        for h in handles:
            h.remove()
        specs = [MaskSpec(s.module, s.side, by_source.get(f"{s.source} (out {s.module})", s.mask), s.source)
                 for s in specs]
        attach_masks(model, specs)
        for m in model.modules():
            if isinstance(m, LastAxisMask) and m.source in by_source:
                m.mask.copy_(by_source[m.source])
        _set_onnx_masks(proto, by_source)
    return Prepared(model, proto, capture_s, len(specs) + len(extra))


def _out_channels(model: nn.Module, site: str) -> int:
    m = dict(model.named_modules())[site]
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_channels


def _coupled_masks(proto: onnx.ModelProto, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One random keep bit per coupled channel group; each mask node's new mask by source."""
    graph = ir.import_graph(proto)
    for p in FOLD_PIPELINE:  # the graph the fold will analyse
        if p.name != "fold_static_masks":
            graph = p(graph, PassContext())
    ana = analyze(graph)
    bit: dict[int, bool] = {}
    out = {}
    for node in graph.nodes:
        if node.op != "ChannelMask" or node.inputs[0].name not in ana.maps:
            continue
        roots = ana.roots_of(node.inputs[0].name)
        for r in roots.tolist():
            bit.setdefault(r, bool(rng.random() < 0.5))
        out[node.attrs["source"]] = torch.tensor([float(bit[r]) for r in roots.tolist()])
    return out


def _set_onnx_masks(proto: onnx.ModelProto, by_source: dict[str, torch.Tensor]) -> None:
    """Point each mask node at a fresh initializer holding its new mask."""
    for node in proto.graph.node:
        if node.op_type != "ChannelMask":
            continue
        source = next(a.s.decode() for a in node.attribute if a.name == "source")
        if source in by_source:
            name = f"{node.name}_coupled_mask"
            value = by_source[source].numpy().astype(np.float32)
            proto.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
            node.input[1] = name


@dataclass
class Row:
    name: str
    macs_ratio: float  # MACs the masks leave (fold without width padding) / dense
    physical_macs_ratio: float  # MACs of the fast-width folded model (with padding) / dense
    latency_ms: dict[str, float]  # medians: dense, exact, fast, measured
    kernel_ratio: float  # profiler kernel time, fast-folded / dense (gate2deploy/kernel_floor.py)
    floor_ratio: float  # the kernel-time floor of the latency ratio (gate2deploy/kernel_floor.py)
    min_ratio: float  # fastest fast-folded run / fastest dense run (least disturbed by other load)
    compile_s: float  # fast widths
    capture_s: float
    measured_s: float  # compile with measured widths (timing included; cached timings are free)
    measured_note: str  # what the measured chooser did
    rel_err: float  # worst of the three folded models
    unfoldable: int

    @property
    def latency_ratio(self) -> float:
        return self.latency_ms["fast"] / self.latency_ms["dense"]

    @property
    def quotient(self) -> float:
        return self.latency_ratio / self.physical_macs_ratio

    @property
    def floor_quotient(self) -> float:
        return self.floor_ratio / self.physical_macs_ratio

    @property
    def kernel_quotient(self) -> float:
        return self.kernel_ratio / self.physical_macs_ratio

    @property
    def quotient_kept(self) -> float:
        return self.latency_ratio / self.macs_ratio

    @property
    def goal_met(self) -> bool:
        return self.quotient <= GOAL_QUOTIENT or self.quotient - self.floor_quotient <= GOAL_FLOOR_GAP


GOAL_QUOTIENT, GOAL_FLOOR_GAP = 1.10, 0.05  # issue 18: quotient <= 1.10 or within 0.05 of the floor


def fold(prepared: Prepared, widths: str = "fast") -> tuple[onnx.ModelProto, PassContext, float, str]:
    """The compiler's work on a captured model with `widths` ("exact", "fast", "measured");
    seconds include the capture; the last item says what `measured` chose (else "")."""
    t0 = time.perf_counter()
    if widths == "measured":
        shape = tuple(d.dim_value for d in prepared.proto.graph.input[0].type.tensor_type.shape.dim)
        folded, ctx, report = fold_measured(prepared.proto, "onnx", lambda: PassContext(unfoldable_policy="keep"),
                                            "onnx", shape)
        changed = sum(c.chosen != c.fast for c in report.layers)
        whole = report.whole_model_ms  # per candidate, per guard round
        note = (f"{report.used}: {changed}/{len(report.layers)} timed layers differ from fast"
                + (", whole " + "; ".join(f"{name} " + "/".join(f"{ms:.2f}" for ms in rounds)
                                          for name, rounds in whole.items()) + " ms" if whole else ""))
    else:
        ctx = PassContext(unfoldable_policy="keep", choose_widths=widths == "fast")
        folded, note = run_pipeline(prepared.proto, "onnx", ctx), ""
    return folded, ctx, prepared.capture_s + time.perf_counter() - t0, note


def relative_error(prepared: Prepared, folded: onnx.ModelProto, size: int, seed: int = 1) -> float:
    """max |ORT(folded) - masked PyTorch| / max |masked PyTorch| on a random normal input."""
    from gate2deploy.verify import make_session
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = prepared.model(x).numpy()
    got = make_session(folded).run(None, {"input": x.numpy()})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def bench(name: str, runs: int, spinning: bool = True) -> Row:
    size = CASES[name].bench_size
    prepared = prepare(name, size)
    fast, ctx, compile_s, _ = fold(prepared)
    exact, _, _, _ = fold(prepared, "exact")
    measured, _, measured_s, note = fold(prepared, "measured")
    dense = capture(build_model(name), torch.randn(1, 3, size, size))
    err = max(relative_error(prepared, m, size) for m in (exact, fast, measured))
    models = {"dense": dense, "exact": exact, "fast": fast}
    same = measured.SerializeToString() == fast.SerializeToString()
    if not same:
        models["measured"] = measured
    shape = (1, 3, size, size)
    lat, fastest = latencies_ms(models, shape, runs=runs, spinning=spinning)
    lat.setdefault("measured", lat["fast"])  # the same graph: timed once
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    kernel_ms = {k: kernel_ms_by_kind(models[k], x, runs) for k in ("dense", "fast")}
    kernel_ratio = sum(kernel_ms["fast"].values()) / sum(kernel_ms["dense"].values())
    floor = floor_ratio(kernel_ms["dense"], work(dense), work(fast))
    dense_macs = model_cost(dense).macs
    return Row(name, model_cost(exact).macs / dense_macs, model_cost(fast).macs / dense_macs, lat,
               kernel_ratio, floor,
               fastest["fast"] / fastest["dense"], compile_s, prepared.capture_s, measured_s - prepared.capture_s,
               note + (" (= fast's graph)" if same else ""), err, len(ctx.fold.unfoldable))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(CASES)}")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per model and variant, in blocks of 10")
    parser.add_argument("--no-spin", action="store_true",
                        help="ONNX Runtime's intra-op workers do not spin (both sessions)")
    args = parser.parse_args(argv)
    names = args.models or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    torch.set_num_threads(2)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{cpu_name()}, ORT {ort.__version__} CPU 2 threads (spinning {'off' if args.no_spin else 'on'}), "
          f"batch 1, medians of {whole_blocks(args.runs)} runs in alternating blocks of 10; "
          f"goal: quotient <= {GOAL_QUOTIENT} or within {GOAL_FLOOR_GAP} of the kernel floor quotient")
    print("| model | input | MACs kept | physical MACs | latency ratio | quotient | floor quotient "
          "| kernel-time quotient | goal "
          "| quotient vs kept | dense ms | exact ms | fast ms | measured ms | measured / fast | measured widths "
          "| min-latency ratio | compile s (capture + passes) | measured passes s | rel. error | unfoldable masks |")
    print("|" + "---|" * 21)
    met = 0
    for name in names:
        r = bench(name, args.runs, spinning=not args.no_spin)
        size = CASES[name].bench_size
        met += r.goal_met
        lat = r.latency_ms
        print(f"| {r.name} | {size} | {r.macs_ratio:.3f} | {r.physical_macs_ratio:.3f} | {r.latency_ratio:.3f} "
              f"| {r.quotient:.2f} | {r.floor_quotient:.2f} | {r.kernel_quotient:.2f} | {'met' if r.goal_met else 'NOT met'} "
              f"| {r.quotient_kept:.2f} | {lat['dense']:.2f} | {lat['exact']:.2f} | {lat['fast']:.2f} "
              f"| {lat['measured']:.2f} | {lat['measured'] / lat['fast']:.3f} | {r.measured_note} "
              f"| {r.min_ratio:.3f} "
              f"| {r.compile_s:.2f} ({r.capture_s:.2f} + {r.compile_s - r.capture_s:.2f}) | {r.measured_s:.2f} "
              f"| {r.rel_err:.1e} | {r.unfoldable} |", flush=True)
    print(f"# goal met by {met} of {len(names)} families")
    return 0


if __name__ == "__main__":
    sys.exit(main())

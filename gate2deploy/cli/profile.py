"""`gate2deploy profile`: measure per-layer latency on the target and write a latency LUT,
Gator's latency-weighted pruning configuration, Gator's timing table and a report.

    gate2deploy profile ckpt.pth --model torchvision.models:resnet50 --input-shape 1,3,224,224 \\
        --target ort --threads 2 -o latency/
    gate2deploy profile --predict latency/lut.json --channels cfg.json

The checkpoint is optional (latency does not depend on weight values; without it the
architecture is built from --model). A Gator checkpoint's own gates are read and its pruned
latency is predicted too. Outputs in the -o folder: lut.json, gator_config.json,
edge_multipliers_by_name.json, timing.csv, multipliers.png, latency_vs_flops.png,
report.html (see gate2deploy.profiling for what each holds).

`--channels` takes a JSON list of channel counts in edge order, {"edges": [...]}, {edge name:
count} or Gator's nested channels_config.
"""
from __future__ import annotations

import json
import math
import sys

from .. import api
from ..errors import UserError
from ..fileio import read_json
from ..profiling.lut import DEFAULT_FRACTIONS, layer_latencies, load_lut, parse_channels, predict, table_of
from ..profiling.device import differences
from ..profiling.measure import Settings, machine_info
from ..targets import ALIASES, TARGETS
from .args import add_gator_arguments, add_mayo_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure layer latency on the target: LUT, Gator config, report")
    p.add_argument("checkpoint", nargs="*", help="state_dict / Gator checkpoint (optional: --model alone profiles "
                   "the architecture), a .pt2 program, or a pickled module with --trust-pickle; several Gator "
                   "checkpoints of one architecture: one LUT and each one's predicted latency (checkpoints.csv)")
    p.add_argument("--model", help="architecture: package.module:callable or file.py:callable")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for the --model callable")
    p.add_argument("--input-shape", help="e.g. 1,3,224,224 (the batch size is the profiled batch)")
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that unpickle Python objects")
    p.add_argument("--target", default="ort", choices=[*TARGETS, *ALIASES],
                   help="runtime to measure on (ort-cpu and tensorrt: earlier names of ort and trt)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (onnx, ort)")
    p.add_argument("-o", "--out", help="output folder (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted profile in the same folder")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="measure on a Ray cluster (HOST:PORT of its head, ray://HOST:PORT or auto): one LUT per "
                        "device class, written to OUT/<class>/ (pip install 'gate2deploy[ray]'; README)")
    p.add_argument("--device-class", action="append", default=[], metavar="NAME",
                   help="with --ray: profile on the nodes offering resource device:NAME (repeatable or "
                        "comma-separated; default: every class the cluster offers)")
    p.add_argument("--edges", choices=("auto", "gator", "groups"), default="auto",
                   help="Gator hyper-edges (ResNet/VGG), channel-analysis groups, or auto")
    add_gator_arguments(p)
    p.add_argument("--widths", default=",".join(str(f) for f in DEFAULT_FRACTIONS),
                   help="fractions of each prunable width to measure (plus each minus one channel on inputs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-cv", type=float, default=0.05, help="re-measure entries less stable than this")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--no-report", action="store_true", help="skip the PNG/HTML report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--criteria-weight", type=float, default=1.0, help="gator_config.json criteria_weight")
    p.add_argument("--gradient-multiplier", type=float, default=1.0, help="gator_config.json gradient_multiplier")
    p.add_argument("--gate-init-prob", type=float, default=0.99, help="gator_config.json gate_init_prob")
    p.add_argument("--static-total-cost", type=float, default=None, help="gator_config.json static_total_cost")
    p.add_argument("--predict", metavar="LUT", help="predict a configuration's latency from this lut.json")
    p.add_argument("--channels", metavar="CFG", help="with --predict: channel configuration JSON")
    p.add_argument("--per-layer", action="store_true", help="with --predict: print each layer's latency")
    p.add_argument("--allow-other-device", action="store_true",
                   help="with --predict: only warn (instead of refusing) when the LUT was measured on another "
                        "device than this machine (CPU model, ISA tiers; the GPU for trt)")
    add_mayo_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.predict:
        return _predict(args)
    fractions = _fractions(args.widths)
    if args.repeats < 3 or args.warmup < 0 or args.max_cv <= 0:
        raise UserError("--repeats must be >= 3, --warmup >= 0 and --max-cv > 0")
    for flag in ("criteria_weight", "gradient_multiplier", "gate_init_prob", "static_total_cost"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):  # JSON has no NaN: Gator could not read it
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number, not {value}")
    checkpoint = args.checkpoint if len(args.checkpoint) > 1 else (args.checkpoint or [None])[0]
    result = api.profile(
        checkpoint, args.input_shape, args.out, model=args.model, model_kwargs=args.model_kwargs,
        trust_pickle=args.trust_pickle, gator_no_last_conv=args.gator_no_last_conv, gator_config=args.gator_config,
        target=args.target, threads=args.threads,
        settings=Settings(warmup=args.warmup, repeats=args.repeats, max_cv=args.max_cv, retries=args.retries),
        fractions=fractions, edges=args.edges, resume=args.resume, report=not args.no_report,
        progress=not args.no_progress, criteria_weight=args.criteria_weight,
        gradient_multiplier=args.gradient_multiplier, gate_init_prob=args.gate_init_prob,
        static_total_cost=args.static_total_cost, ray=args.ray, device_classes=tuple(args.device_class),
        mayo_model=args.mayo_model, mayo_set=args.mayo_set, mayo_root=args.mayo_root,
        mayo_dataset=args.mayo_dataset, mayo_overriders_update=args.mayo_overriders_update)
    if isinstance(result, dict):  # --ray: one profile per device class
        for cls, one in result.items():
            print(f"== device class {cls} ({_nodes_text(one.lut)})")
            _print_result(one)
        return 0
    _print_result(result)
    return 0


def _nodes_text(lut: dict) -> str:
    nodes = lut["fleet"]["nodes"]
    return ", ".join(f"{n['hostname']} node {node[:8]}: {n['jobs']} jobs" for node, n in nodes.items()) or "resumed"


def _print_result(result) -> None:
    cal = result.lut["calibration"]
    print(f"profiled {len(result.table.layers)} layers, {len(result.table.edges)} edges ({result.table.edge_source}) "
          f"in {result.seconds:.1f} s: {result.entries_measured} LUT entries measured"
          + (f", {result.entries_resumed} resumed" if result.entries_resumed else "")
          + f", {result.unstable} unstable")
    print(f"whole model: {cal['whole_model_ms']:.3f} ms ({cal['whole_model_method']}), "
          f"layer sum {cal['layer_sum_ms']:.3f} ms, in-graph scales {cal['scales']}")
    if result.table.edge_source == "gator hyper-edges" and result.table.edges[0].name != "stem":
        # the naive sequential mapper's edges (a ResNet's always open with the stem edge)
        print("note: the edges follow Gator's naive sequential mapper (models/gates_mapper.py), which Gator's "
              "own code cannot run at its published HEAD (create_hyper_edge without conv_names): "
              "gator_config.json is in its order, for a Gator with that mended")
    config = json.loads((result.out_dir / "gator_config.json").read_text())
    slower = [str(i) for i, m in enumerate(config["edge_multipliers"]) if m <= 0]
    if slower:
        print(f"warning: halving edge(s) {', '.join(slower)} does not make the model faster on this target "
              "(multiplier <= 0, kept as measured; see report.html)")
    if "checkpoints.csv" in result.files:
        print((result.out_dir / "checkpoints.csv").read_text().rstrip())
    elif result.current_ms is not None:
        print(f"checkpoint's gated configuration: predicted {result.current_ms:.3f} ms")
    print(f"wrote {', '.join(str(result.out_dir / f) for f in result.files)}")


def _predict(args) -> int:
    if not args.channels:
        raise UserError("--predict needs --channels CFG.json (the configuration to estimate)")
    lut = load_lut(args.predict)
    _check_device(args, lut)
    table = table_of(lut)
    data = read_json(args.channels, "--channels")
    channels = parse_channels(table, data)
    ms = predict(lut, channels, table)
    full = predict(lut, None, table)
    # The layers' own timings, without the calibration's intercept: a fit of the profile's
    # timings may give a positive intercept, which alone would predict a constant.
    layers_ms = sum(layer_ms for *_, layer_ms in layer_latencies(lut, None, table))
    if not layers_ms > 0:
        raise UserError(f"{args.predict}: the LUT's layer timings for the unpruned model sum to {layers_ms} ms: "
                        "they are all zero, nothing to predict from")
    if args.per_layer:
        for name, key, kernel, layer_ms in layer_latencies(lut, channels, table):
            print(f"{name}\t{key}\t{kernel}\t{layer_ms:.4f} ms")
    print(f"predicted latency: {ms:.3f} ms (unpruned {full:.3f} ms, ratio {ms / full:.3f}) on {lut['target']}, "
          f"{lut['threads']} threads, batch {lut['batch']}")
    return 0


def _check_device(args, lut: dict) -> None:
    """A LUT is true for the device it was measured on: refuse another one unless
    --allow-other-device (then one warning line)."""
    differ = differences(lut.get("machine", {}), machine_info(), lut.get("target", ""))
    if not differ:
        return
    what = f"{args.predict} was measured on another device ({'; '.join(differ)})"
    if not args.allow_other_device:
        raise UserError(f"--predict: {what}; predict on that device, or pass --allow-other-device")
    print(f"warning: {what}; predicting for that device", file=sys.stderr)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--widths {text!r} is not a comma-separated list of fractions") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--widths {text!r}: fractions must be in (0, 1]")
    return values

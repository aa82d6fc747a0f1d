"""`gate2deploy info`: per-layer MACs and parameters of a gated model, dense vs effective.

Dense is the model as trained (every masked channel still computed); effective is what the
fold leaves (the same analysis `export` runs, nothing written but the report). For dynamic
gates (CG, PG, FBS) the effective cost depends on the data: with `--sample-inputs` each gated
layer's gate-on fraction and expected MACs are measured on them. With `--out`
the table is saved as YAML (.yaml/.yml) or JSON (.json), like the seed's `info` with
`plumbing`.
"""
from __future__ import annotations

import yaml

from .. import report as rep
from ..capture import capture
from ..errors import UserError
from ..fileio import check_writable, write_text
from ..frontend import add_model_arguments, build_gated_model
from ..pipeline import PassContext, run_pipeline
from .export import add_compile_arguments, gated_layer_report, load_samples


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="per-layer MACs and params of a gated model, dense vs effective")
    add_model_arguments(p)
    p.add_argument("--out", help="write the table as .yaml/.yml or .json")
    add_compile_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.out:
        check_writable(args.out)
        if not args.out.endswith((".yaml", ".yml", ".json")):
            raise UserError(f"--out {args.out}: use a .yaml, .yml or .json file name")
    gated = build_gated_model(args)
    captured = capture(gated.model, gated.example)
    ctx = PassContext(unfoldable_policy="keep", choose_widths=args.physical_widths == "fast")
    effective = run_pipeline(captured, "onnx", ctx)
    dense, eff = rep.model_cost(captured), rep.model_cost(effective)
    layers = []
    for row in rep.compare(dense, eff):
        d = dense.layers[row["layer"]]
        e = eff.layers.get(row["layer"])
        layers.append({**row, "params_before": d.params, "params_after": e.params if e else 0})
    info = {
        "input_shape": list(gated.example.shape),
        "mask_sources": gated.sources,
        "dense": {"macs": dense.macs, "params": dense.params},
        "effective": {"macs": eff.macs, "params": eff.params},
        "unfoldable": [vars(u) for u in ctx.fold.unfoldable],
        "pinned_ops": [vars(o) for o in ctx.fold.pinned_ops],
        "layers": layers,
        **gated_layer_report(gated, captured, load_samples(args, gated)),
    }
    print(rep.format_table(layers))
    print(f"MACs   dense {dense.macs:,}  effective {eff.macs:,}")
    print(f"params dense {dense.params:,}  effective {eff.params:,}")
    if info.get("gate_statistics"):
        for layer in info["gate_statistics"]["layers"]:
            print(f"gated {layer['name']}: gate-on {layer['gate_on_fraction']:.3f}, "
                  f"expected MACs {layer['expected_macs']:,} of {layer['dense_macs']:,}")
    if args.out:
        text = rep.to_json(info) if args.out.endswith(".json") else yaml.safe_dump(
            yaml.safe_load(rep.to_json(info)), sort_keys=False)
        write_text(args.out, text)
    return 0

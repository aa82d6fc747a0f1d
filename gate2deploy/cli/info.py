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
from ..api import info_with
from ..errors import UserError
from ..fileio import check_writable, write_text
from ..options import InfoOptions, from_namespace
from .args import add_compile_arguments, add_model_arguments


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
    info = info_with(None, None, from_namespace(InfoOptions, args))
    layers = info["layers"]
    print(rep.format_table(layers))
    print(f"MACs   dense {info['dense']['macs']:,}  effective {info['effective']['macs']:,}")
    print(f"params dense {info['dense']['params']:,}  effective {info['effective']['params']:,}")
    if info.get("gate_statistics"):
        for layer in info["gate_statistics"]["layers"]:
            print(f"gated {layer['name']}: gate-on {layer['gate_on_fraction']:.3f}, "
                  f"expected MACs {layer['expected_macs']:,} of {layer['dense_macs']:,}")
    if info["mask_sources"].get("mayo"):
        print_mayo_info(info["mask_sources"]["mayo"]["info"])
    if info["mask_sources"].get("slimmable"):
        print_population(info["mask_sources"]["slimmable"])
    if args.out:
        text = rep.to_json(info) if args.out.endswith(".json") else yaml.safe_dump(
            yaml.safe_load(rep.to_json(info)), sort_keys=False)
        write_text(args.out, text)
    return 0


def print_mayo_info(table: dict) -> None:
    """Mayo's own per-layer table (importers/mayo.py `mayo_info`: Mayo's estimate rules)."""
    print("Mayo info (Mayo's estimate rules: mayo/net/tf/estimate.py, gate/layers.py):")
    print(f"{'layer':<40} {'shape (NHWC)':<16} {'macs':>12} {'weights':>10} {'density':>8} {'active':>7}")
    for r in table["items"]:
        if "macs" not in r:
            continue
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['layer']:<40} {shape:<16} {r['macs']:>12,} {r['weights']:>10,} {r['density']:>8.3f} "
              f"{r['active']:>7.3f}")
    print(f"{'total':<40} {'':<16} {table['footer']['macs']:>12,}")


def print_population(sl: dict) -> None:
    """The checkpoint's stored width configurations, for `export --population N`."""
    from .export import slimmable_summary

    print(slimmable_summary(sl))
    entries = sl.get("population") or []
    if not entries:
        print("population: the checkpoint stores no configurations (population_data)")
        return
    print(f"population: {len(entries)} configurations (export one with --population N)")
    print(f"{'N':>5} {'loss':>10} {'MFLOPs':>10} {'ratio':>7}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for e in entries:
        flops = e["flops"] / 1e6 if e["flops"] is not None else None
        print(f"{e['index']:>5} {fmt(e['loss'], '10.4f')} {fmt(flops, '10.3f')} {fmt(e['ratio'], '7.3f')}")

"""Argument groups shared by the subcommands (Polygraphy's tools/args): each declares flags
whose names are the fields of gate2deploy.options' dataclasses, which the subcommand builds
from the parsed arguments (options.from_namespace)."""
from __future__ import annotations

import argparse

from ..importers.netslim import RULES, SCOPES
from ..importers.sensai import FORMS as SENSAI_FORMS
from ..options import PHYSICAL_WIDTHS


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="+", help="a .pt2 torch.export program, a state_dict checkpoint "
                   "(with --model), or a pickled module (with --trust-pickle); with --sensai-grouping: "
                   "a folder of sensAI group models or several group model files")
    p.add_argument("--model", help="architecture for a state_dict: package.module:callable or file.py:callable")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for the --model callable")
    p.add_argument("--model-path", action="append", default=[], metavar="DIR",
                   help="folder to import --model's and pickled modules' code from (repeatable); a "
                        "--model file.py finds its own repository's root without it")
    p.add_argument("--input-shape", required=True,
                   help="e.g. 1,3,224,224: the shape the model is captured and verified at (export: the batch "
                        "axis stays dynamic unless --static-batch)")
    p.add_argument("--max-input-elements", type=int, default=2**27,
                   help="refuse an --input-shape with more elements than this before allocating (default %(default)s)")
    p.add_argument("--max-memory", type=float, metavar="GIB",
                   help="refuse when the export's estimated memory (weights and activations at the batch "
                        "verified, traced on fake tensors before anything is allocated) exceeds this many GiB "
                        "(default: the memory available on this machine)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that unpickle Python objects (runs code from the file)")
    p.add_argument("--netslim-density", type=float, help="network slimming: fraction of BN channels to keep")
    p.add_argument("--netslim-rule", choices=RULES, default="mayo",
                   help="mayo: raw gamma, keep > (k+1)-th largest; abs: |gamma| percentile (Liu et al.)")
    p.add_argument("--netslim-scope", choices=SCOPES, default="global", help="one threshold for all layers, or per layer")
    add_gator_arguments(p)
    p.add_argument("--fbs-rate", type=float,
                   help="PyTorch-FBS: the `rate` (fraction of channels kept) the ChannelPruning blocks were "
                        "trained at, which the checkpoint does not store (main.py writes it into the file name)")
    p.add_argument("--sensai-grouping", metavar="NPY|JSON",
                   help="sensAI: the class groups (grouping_config.npy, or JSON lists); the checkpoints are "
                        "then the group models, combined as sensAI's grouped evaluation into one model")
    p.add_argument("--sensai-form", choices=SENSAI_FORMS, default="auto",
                   help="sensAI: fused (groups of equal structure as one model of grouped convolutions, each group "
                        "padded to the widest), hybrid (fused, the layers that run faster per group split back into "
                        "per-group convolutions), padded (every group its own model, its widths rounded up to whole "
                        "NCHWc blocks), branches (every group its own model as it is), or auto (default: the "
                        "fastest of them, timed on ONNX Runtime CPU at the export's batch)")
    p.add_argument("--sensai-threads", type=int, default=2,
                   help="sensAI: ONNX Runtime threads the auto form is timed with (default 2)")
    p.add_argument("--sensai-no-fuse", action="store_true", help="sensAI: the same as --sensai-form branches")
    add_slimmable_arguments(p)
    add_mayo_arguments(p)


def add_mayo_arguments(p: argparse.ArgumentParser) -> None:
    """Mayo (TensorFlow) checkpoints (importers/mayo.py); needs `pip install gate2deploy[mayo]`."""
    p.add_argument("--mayo-model", action="append", default=[], metavar="YAML",
                   help="Mayo: the model YAML (e.g. models/gate/resnet18.yaml; repeat to merge more YAMLs in "
                        "order, as on Mayo's command line, e.g. models/override/prune/netslim.yaml); the "
                        "checkpoint is then a TensorFlow checkpoint prefix or folder")
    p.add_argument("--mayo-set", action="append", default=[], metavar="KEY=VALUE",
                   help="Mayo: a config override as on Mayo's command line (e.g. _gate.density=0.5), repeatable")
    p.add_argument("--mayo-root", metavar="DIR",
                   help="Mayo: the repository root relative YAML paths are found from (default: the nearest "
                        "folder above the YAML that holds models/)")
    p.add_argument("--mayo-dataset", metavar="YAML",
                   help="Mayo: the dataset YAML (e.g. datasets/cifar10.yaml) for $(dataset.task.num_classes); "
                        "without it the classifier's width is read from the checkpoint")
    p.add_argument("--mayo-overriders-update", action="store_true",
                   help="Mayo: recompute NetworkSlimmer masks from the stored BatchNorm gammas as Mayo's "
                        "overriders-update does, instead of using the masks stored in the checkpoint")


def add_slimmable_arguments(p: argparse.ArgumentParser) -> None:
    """Slimmable networks (Joslim; importers/slimmable.py): which width to export."""
    p.add_argument("--width", help="slimmable model: uniform width multiplier in (0, 1]")
    p.add_argument("--width-vector", metavar="JSON",
                   help="slimmable model: a JSON list with one width multiplier per search dimension, "
                        "decoded to channels as Joslim does")
    p.add_argument("--population", metavar="N",
                   help="slimmable model: configuration N (counted from 0) of the checkpoint's population_data "
                        "(`info` lists them), or `all` for a sweep over every one")
    p.add_argument("--recalibration-batches", type=int,
                   help="slimmable model: BatchNorm recalibration passes over --sample-inputs (default: all batches)")
    p.add_argument("--recalibration-batch-size", type=int,
                   help="slimmable model: samples per recalibration pass (default: min(32, number of samples))")


def add_gator_arguments(p: argparse.ArgumentParser) -> None:
    """Gator's options that its checkpoints do not store (importers/gator.py)."""
    p.add_argument("--gator-no-last-conv", metavar="true|false",
                   help="Gator's no_last_conv (no gate on the last residual stream / last conv); "
                        "unstated, the checkpoint's gate count decides")
    p.add_argument("--gator-config", metavar="JSON",
                   help="the gating config given to Gator's --gating_config_path (its no_last_conv is read)")


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `export` and `info` (which reports what `export` would build)."""
    p.add_argument("--physical-widths", choices=PHYSICAL_WIDTHS, default="fast",
                   help="fast (default): round folded layers up to widths ONNX Runtime's blocked CPU kernels "
                        "run fast (zero padding channels, still exact; passes/choose_widths.py); "
                        "exact: every layer exactly as wide as its kept channels; "
                        "measured: time candidate widths per layer on this machine's ONNX Runtime CPU, "
                        "cached per CPU, and keep the whole model only if not slower than fast's "
                        "(trt: not timed, uses fast; gate2deploy/measure_widths.py)")
    p.add_argument("--sample-inputs", help="representative inputs (.npy/.npz/.pt, shape (M, *input shape[1:])) "
                   "for gate statistics of CG/PG/FBS layers and PG calibration; also used for verification")

"""Argument groups shared by the subcommands (Polygraphy's tools/args): each declares flags
whose names are the fields of gate2deploy.options' dataclasses, which the subcommand builds
from the parsed arguments (options.from_namespace)."""
from __future__ import annotations

import argparse

from ..importers.netslim import RULES, SCOPES


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
    p.add_argument("--sensai-no-fuse", action="store_true",
                   help="sensAI: run every group as its own branch instead of fusing groups of equal structure "
                        "into grouped convolutions (fusion pads every group to the widest; for big compute-bound "
                        "groups with spread widths that padding can cost more than fusion saves)")
    add_slimmable_arguments(p)


def add_slimmable_arguments(p: argparse.ArgumentParser) -> None:
    """Slimmable networks (Joslim; importers/slimmable.py): which width to export."""
    p.add_argument("--width", help="slimmable model: uniform width multiplier in (0, 1]")
    p.add_argument("--width-vector", metavar="JSON",
                   help="slimmable model: a JSON list with one width multiplier per search dimension, "
                        "decoded to channels as Joslim does")
    p.add_argument("--population", metavar="N",
                   help="slimmable model: the N-th configuration stored in the checkpoint's population_data "
                        "(`info` lists them)")
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
    p.add_argument("--physical-widths", choices=("fast", "exact"), default="fast",
                   help="fast (default): round folded layers up to widths ONNX Runtime's blocked CPU kernels "
                        "run fast (zero padding channels, still exact; passes/choose_widths.py); "
                        "exact: every layer exactly as wide as its kept channels")
    p.add_argument("--sample-inputs", help="representative inputs (.npy/.npz/.pt, shape (M, *input shape[1:])) "
                   "for gate statistics of CG/PG/FBS layers and PG calibration; also used for verification")

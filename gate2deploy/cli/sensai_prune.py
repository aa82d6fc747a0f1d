"""`gate2deploy sensai-prune`: a trained model + class groups + sample images -> sensAI's
per-group pruned group models, as the export (`--sensai-grouping`) reads them.

The seed's steps get_prune_candidates.py (APoZ statistics per group on that group's
images) and prune_and_get_model.py (cut the candidates, keep the head rows [0] + group)
in one command; the rules and thresholds are in gate2deploy/importers/sensai.py. Written:
OUT/grouping_config.npy (.json when the groups differ in size) and
OUT/<arch>/<arch>_<g>_pruned_model.pth (whole pickled modules, as the seed saves them: their
classes must be importable where they are loaded). sensAI retrains these before serving
(cifar_group.py); gate2deploy exports them as they are.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import OptionError, UserError
from ..fileio import read_array, temporary_prefix
from ..importers import sensai
from ..loading import build_model, load_checkpoint, load_weights


def add_parser(sub) -> None:
    p = sub.add_parser("sensai-prune", help="sensAI: per-class-group APoZ pruning into group models for export")
    p.add_argument("checkpoint", help="the trained model: a pickled module (with --trust-pickle) or a "
                   "state_dict (with --model)")
    p.add_argument("--model", help="architecture for a state_dict: package.module:callable or file.py:callable")
    p.add_argument("--model-kwargs", help="JSON keyword arguments for the --model callable")
    p.add_argument("--model-path", action="append", default=[], metavar="DIR",
                   help="folder to import --model's code from (repeatable), as for export")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that unpickle Python objects (runs code from the file)")
    p.add_argument("--sensai-grouping", required=True, metavar="NPY|JSON",
                   help="the class groups (grouping_config.npy or JSON lists)")
    p.add_argument("--sample-inputs", required=True, help="images, .npy of shape (M, C, H, W), preprocessed")
    p.add_argument("--labels", required=True, help="their class labels, .npy of M integers")
    p.add_argument("-o", "--out", required=True, help="output folder (created; existing files are replaced)")
    p.add_argument("--arch", help="the name in the files <arch>_<g>_pruned_model.pth (default: the model's class)")
    p.add_argument("--apoz-threshold", type=float, default=sensai.APOZ_THRESHOLD,
                   help="prune channels whose APoZ %% is above this (default %(default)g, the seed's CIFAR value)")
    p.add_argument("--mean-threshold", type=float, default=sensai.MEAN_THRESHOLD,
                   help="... and whose mean |activation| is below this (default %(default)g)")
    p.add_argument("--batch-size", type=int, default=sensai.APOZ_BATCH,
                   help="images per statistics batch (the seed averages per-batch scores; default %(default)d)")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-drawn 'other' head row")
    p.set_defaults(func=run)


def _load_npy(path: str, what: str) -> np.ndarray:
    return read_array(path, what, kinds=(".npy", ".npz"))


def run(args) -> int:
    if args.batch_size < 1:
        raise OptionError("--batch-size must be at least 1")
    groups = sensai.load_grouping(args.sensai_grouping)
    sensai.check_grouping(groups)
    images = _load_npy(args.sample_inputs, "--sample-inputs")
    labels = _load_npy(args.labels, "--labels")
    if images.ndim != 4:
        raise UserError(f"--sample-inputs {args.sample_inputs}: expected (M, C, H, W) images, got {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"--labels {args.labels}: expected a 1-d integer array, got {labels.dtype} {labels.shape}")
    ckpt = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle, model_paths=args.model_path)
    model = ckpt.module
    if model is None:
        if not args.model:
            raise OptionError(f"{ckpt.path} holds only weights: pass --model package.module:callable")
        model = build_model(args.model, args.model_kwargs, args.model_path)
        load_weights(model, ckpt.state_dict, str(ckpt.path))
    arch = args.arch or type(model).__name__.lower()
    if not arch or arch in (".", "..") or Path(arch).name != arch or len(arch) > 100:
        raise OptionError(f"--arch {arch!r}: a name for the files <arch>_<g>_pruned_model.pth inside -o "
                          "(no path separators, at most 100 characters)")
    _check_out(Path(args.out), arch)
    _check_picklable(model)
    pruned = sensai.prune_groups(model, groups, images, labels, args.apoz_threshold, args.mean_threshold,
                                 args.batch_size, args.seed)
    _write(Path(args.out), arch, groups, [m for m, _ in pruned])
    for g, (m, cands) in enumerate(pruned):
        kept = sum(p.numel() for p in m.parameters())
        print(f"group {g} {groups[g]}: pruned {sum(len(c) for c in cands)} channels, {kept:,} parameters")
    print(f"wrote {len(pruned)} group models to {Path(args.out) / arch}")
    return 0


def _check_out(out: Path, arch: str) -> None:
    """Before any work: -o can be made a folder (or is one, writable), and its <arch> entry is
    not a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file, not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: directory {parent} does not exist")
    for folder in (out, parent):
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise UserError(f"cannot write {out}: directory {folder} is not writable")
    if (out / arch).exists() and not (out / arch).is_dir():
        raise UserError(f"cannot write {out / arch}: it is a file, and the group models go into that folder")


def _check_picklable(model) -> None:
    """sensAI's group files are whole pickled modules, which name their class by module path:
    a class from `--model path/file.py:fn` lives in a module made up for that import, which
    no reader could import again (torch.save fails on it, after the pruning)."""
    module = type(model).__module__
    if module.startswith("gate2deploy_user_"):
        raise OptionError(f"the group models are saved as whole pickled modules (sensAI's format), and "
                          f"{type(model).__name__} comes from a file given by path; give --model as "
                          "package.module:callable with its repository on --model-path or PYTHONPATH")


def _write(out: Path, arch: str, groups: list[list[int]], models) -> None:
    """Everything into a temporary folder beside `out`, then moved in: no partial output
    (`out` checked by _check_out before the work)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        _write_staged(out, parent, arch, groups, models)
    except OSError as exc:  # a full disk, a folder turned read-only meanwhile: one line, no traceback
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def _write_staged(out: Path, parent: Path, arch: str, groups: list[list[int]], models) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out.name), dir=parent))
    try:
        (tmp / arch).mkdir()
        if len({len(g) for g in groups}) == 1:
            np.save(tmp / "grouping_config.npy", np.array(groups, dtype=np.int64))
        else:
            (tmp / "grouping_config.json").write_text(json.dumps(groups))
        for g, m in enumerate(models):
            buf = io.BytesIO()
            torch.save(m, buf)  # the seed's format: the whole module
            (tmp / arch / f"{arch}_{g}_pruned_model.pth").write_bytes(buf.getvalue())
        out.mkdir(exist_ok=True)
        for src in sorted(tmp.rglob("*")):
            dst = out / src.relative_to(tmp)
            if src.is_dir():
                dst.mkdir(exist_ok=True)
            else:
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

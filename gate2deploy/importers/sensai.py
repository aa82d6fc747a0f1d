"""sensAI (seed 004, GuanhuaWang/sensAI): N class-group models -> ONE module that computes the
seed's grouped evaluation, with the groups of equal structure fused into one wide model.

What sensAI writes and how it combines it (read from the seed; gating-semantics.md §7):
- `grouping_config.npy` (group_selection.py `np.save(..., groups)`; copied next to the pruned
  models by prune_and_get_model.py `main`): an int array n_groups x group_size, row g = the
  classes of group g. JSON (a list of lists, groups may differ in size) is accepted too.
- Group models are whole pickled modules (`torch.save(model)`): prune_and_get_model.py
  `prune_cifar_worker` writes `<arch>_<g>_pruned_model.pth`, the retraining script
  cifar_group.py `main` writes `<arch>_<g>_pruned_group_model.pth` (what evaluate.py reads).
  The group index g is the number between the architecture and `_pruned`.
- Heads (prune_utils/layer_prune.py `prune_output_linear_layer_`): a multi-class group keeps
  the rows `[0] + group classes` (row 0 re-initialised: the "other" output); a single-class
  group (`use_bce`, set when groups have one class: prune_and_get_model.py `main`,
  cifar_group.py `main`) keeps one row, its class's logit.
- Combination (evaluate.py `GroupedModel.forward`): multi-class groups: per group
  `softmax(model(x), dim=1)[:, 1:]`, concatenated in group order, then
  `mm(., eye(n)[perm])` with perm = the groups' classes concatenated, i.e. the column of
  class perm[j] is concatenated column j. Single-logit mode (`args.bce`): the logit
  `model(x)[:, 0]` of every group stacked to (B, N) and softmaxed across the groups, then the
  same permutation.

Decisions where the seed is silent or wrong:
- The mode follows the heads: every head one row (every group one class) -> single-logit
  mode; every head `len(group) + 1` rows -> multi-class mode; anything else is refused (the
  seed's evaluate.py decides by a flag / "10 groups on CIFAR-10", which a file cannot carry).
- evaluate.py's single-logit mode `.squeeze()`s the stacked (B, N) logits, which at batch 1
  leaves a vector and `softmax(dim=1)` fails; here the (B, N) shape is kept at every batch.
- The permutation is applied as an index (Gather), not a matmul with eye(n)[perm]: the same
  numbers exactly (each output is one probability times 1 plus zeros).
- A folder holds the group models under the names above (other files are ignored), ordered
  by their group index, which must be 0..N-1 once each. Explicit files: ordered by the group
  index in their names when every name carries one, otherwise in the order given.

Horizontal fusion (`fuse_groups`), done at the PyTorch level: group models of the same
structure (the same module classes at the same module paths, the same layer hyper-parameters
apart from widths) become one model whose every tensor holds all groups' channels side by
side, each group's block zero-padded to the widest group rounded up to ONNX Runtime's NCHWc
channel block (`_block_width`: a grouped conv runs in the fast blocked layout only with
whole blocks per group). The model's own forward runs on these wide tensors. Why at the
PyTorch level and not on the ONNX graph: the fused module is an ordinary model, so the usual
capture, fold and verification apply unchanged, and its check against the group models is
a PyTorch run. Per layer:
- a Conv2d reading the shared input: output channels concatenated (one dense conv);
- a Conv2d reading grouped channels: one conv with group=N, group g's weights in its block;
- BatchNorm2d: per channel, the padding channels get weight 0, bias 0, mean 0, var 1 (so
  they stay exactly 0);
- Linear reading grouped features: a grouped 1x1 conv (group=N), not a block-diagonal matrix
  (which costs N times the MACs); reading the shared input: rows concatenated;
- parameter-free layers (ReLU, pooling, dropout, ...) equal in every group: kept as they are.
Padding channels are zero at every layer, so each group computes what its own model computes
(float summation order aside). The fused model is checked against the group models on two
inputs; a forward that is not width-agnostic (hard-coded widths, channel concat/split) fails
that check and the groups run as parallel branches instead, as do groups whose structure has
no partner. `GroupedModel.plan` records which groups were fused and why others were not (the
export report's `mask_sources.sensai`).

Forms and the choice between them (`grouped_model(form=...)`, `--sensai-form`):
- fused: as above. Padding costs MACs: with group widths a few % apart, rounding every group
  up to the widest (and to whole NCHWc blocks) costs up to ~1.5x MACs in a layer, and at
  batch 1 on big maps that is time (VGG-19-BN 64->64 at 32x32, 10 groups of 29-35 channels
  padded to 40: grouped 7.5 ms vs 3.6 ms per group, 1 thread).
- hybrid: fused, with each grouped conv that runs faster per group replaced by a SplitConv:
  the groups' own convs (and their own BatchNorm right after, which ORT fuses into the conv)
  on their real channels, outputs padded back to the block width, so the fused layers
  around it are unchanged. Per layer, both forms are timed alone on ONNX Runtime at the
  layer's input shape; where timing fails, a MAC rule (SPLIT_MAC_RATIO,
  SPLIT_MIN_GROUP_MACS). Checked against the group models like the fused model.
- padded: every group its own model in one graph, each layer's width rounded up to whole
  NCHWc blocks (the fusion of one group: zero channels, exact). APoZ pruning leaves widths
  such as 20, 47, 79: ONNX Runtime runs a conv in its blocked layout only when the width is a
  multiple of the block (passes/choose_widths.py), so 11 of a pruned VGG-19 group model's 16
  convs ran im2col (tools/bench_sensai.py, ORT 1.31, AVX2, 2 threads, 10 groups at batch 1,
  branches / padded: VGG-19-BN 1.03-1.04x, bottleneck ResNet-56 1.43-1.56x; fused stays faster
  for ResNet). Groups that cannot be fused at all (width-dependent forwards) stay as they are.
- branches: every group its own model in one graph.
- auto (default): every available form is built and timed on ONNX Runtime CPU
  (`time_forms`: captured as the export captures, default spinning, `threads` threads,
  the export's batch, interleaved blocks, median); the fastest is kept. Where timing fails
  (capture or ORT errors), the fewest MACs win, ties going to the fewer ops
  (FORM_PREFERENCE). Timing is on the machine that exports: export on the deployment
  machine (or pass --sensai-form) when they differ. The plan lists every candidate's MACs
  and time, the form kept and how it was chosen.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, OptionError, UserError, first_line
from ..fileio import read_array
from ..gate_stats import run_with_hooks
from ..passes.choose_widths import BLOCK, MIN_MULTIPLE

# <arch>_<group>_pruned_group_model.pth (cifar_group.py) or <arch>_<group>_pruned_model.pth
# (prune_and_get_model.py)
GROUP_FILE = re.compile(r"^(?P<arch>.+)_(?P<group>\d+)_pruned(?:_group)?_model\.pth$")

# The fused model against the group models: normwise max|fused - group| / max|group| of the
# logits. Summation order is all that may differ; gate2deploy.verify's default contract.
FUSE_RTOL = 1e-4

# The forms of the grouped model (grouped_model): "fused" every layer of equal-structure groups
# one grouped layer; "hybrid" the same with chosen layers run per group on their real widths
# (SplitConv); "padded" every group its own model with its widths rounded up to whole NCHWc
# blocks; "branches" every group its own model as it is; "auto" the fastest of them, timed.
FORMS = ("auto", "fused", "hybrid", "padded", "branches")
FORM_PREFERENCE = ("fused", "hybrid", "branches", "padded")  # MAC ties: fewer ops, then no padding
TIMING_THREADS = 2  # CompiledModel.session's default
TIMING_RUNS = 20  # per candidate, interleaved in blocks (gate2deploy/benchmark.py)
# The MAC rule of a layer when it cannot be timed: run it per group when padding to the block
# width costs more than this factor in MACs and a group's layer is big enough (real MACs per
# group) that its own op's overhead does not dominate (tools/bench_sensai.py, 10 groups,
# AVX2, 1 thread: 64->64 3x3 at 32x32, widths 29-35 padded to 40: grouped 7.5 ms, per group
# 3.6 ms; 16->16 at 8x8 padded 9 -> 16: grouped 0.08 ms, per group 0.13 ms).
SPLIT_MAC_RATIO = 1.15
SPLIT_MIN_GROUP_MACS = 1e6

SINGLE = "single-logit"
MULTI = "multi-class"


# --------------------------------------------------------------------------- inputs

def load_grouping(path: str | Path) -> list[list[int]]:
    """The class groups from grouping_config.npy (n_groups x group_size ints) or a JSON list
    of lists of ints."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"--sensai-grouping {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OptionError(f"--sensai-grouping {path} is not valid JSON: {exc}") from None
    else:
        array = read_array(path, "--sensai-grouping", kinds=(".npy", ".npz"))
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise OptionError(f"--sensai-grouping {path}: expected an integer array n_groups x group_size, "
                              f"got {array.dtype} {array.shape}")
        raw = array.tolist()
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(g, list) and g and all(type(c) is int for c in g) for g in raw)):
        raise OptionError(f"--sensai-grouping {path}: expected a non-empty list of non-empty lists of "
                          "class indices")
    return raw


def check_grouping(groups: list[list[int]]) -> int:
    """The number of classes; every class 0..n-1 must be in exactly one group."""
    flat = [c for g in groups for c in g]
    n = len(flat)
    seen: dict[int, int] = {}
    for g, classes in enumerate(groups):
        for c in classes:
            if c in seen:
                raise OptionError(f"sensAI grouping: class {c} is in group {seen[c]} and group {g}; "
                                  "each class must be in exactly one group")
            seen[c] = g
    outside = sorted(c for c in flat if not 0 <= c < n)
    if outside:
        missing = sorted(set(range(n)) - set(flat))
        raise OptionError(f"sensAI grouping: {len(groups)} groups of {n} classes must cover classes 0..{n - 1}; "
                          f"class {outside[0]} is outside, class {missing[0]} missing")
    return n


def group_files(paths: list[str | Path], n_groups: int) -> list[Path]:
    """The group model files in group order, from one folder or from several files."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        files = sorted(p for p in folder.iterdir() if p.is_file() and GROUP_FILE.match(p.name))
        if not files:
            raise CheckpointError(f"{folder} holds no sensAI group models (<arch>_<group>_pruned_group_model.pth)")
        return _by_index(files, n_groups, str(folder))
    for p in paths:
        if p.is_dir():
            raise CheckpointError(f"{p} is a folder: give one folder of group models or several files, not both")
    if all(GROUP_FILE.match(p.name) for p in paths):
        return _by_index(paths, n_groups, "the group model files")
    if len(paths) != n_groups:
        raise OptionError(f"{len(paths)} group model files for {n_groups} groups in the grouping")
    return paths


def _by_index(files: list[Path], n_groups: int, where: str) -> list[Path]:
    by_group: dict[int, Path] = {}
    for f in files:
        g = int(GROUP_FILE.match(f.name)["group"])
        if g in by_group:
            raise CheckpointError(f"{where}: two models for group {g}: {by_group[g].name} and {f.name}")
        by_group[g] = f
    extra = sorted(g for g in by_group if g >= n_groups)
    if extra:
        raise OptionError(f"{where}: a model for group {extra[0]} ({by_group[extra[0]].name}), but the grouping "
                          f"has {n_groups} groups")
    missing = [g for g in range(n_groups) if g not in by_group]
    if missing:
        raise CheckpointError(f"{where}: no model for group {missing[0]} (of {n_groups} groups in the grouping)")
    return [by_group[g] for g in range(n_groups)]


def head_rows(models: list[nn.Module], groups: list[list[int]], example: torch.Tensor,
              names: list[str] | None = None) -> tuple[list[int], str]:
    """Each group model's output size on `example`, and the combination mode the heads imply."""
    names = names or [f"group {g}" for g in range(len(models))]
    rows = []
    for g, (m, name) in enumerate(zip(models, names)):
        m.eval()
        try:
            with torch.no_grad():
                out = m(example)
        except Exception as exc:  # noqa: BLE001 - any failure here is the input not fitting
            first = first_line(exc)
            raise UserError(f"sensAI group {g} ({name}) does not run on input shape "
                            f"{tuple(example.shape)}: {first}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != example.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"sensAI group {g} ({name}) returns {shape}, not (batch, logits)")
        rows.append(int(out.shape[1]))
    if all(r == 1 for r in rows) and all(len(c) == 1 for c in groups):
        return rows, SINGLE
    for g, (r, classes) in enumerate(zip(rows, groups)):
        if r != len(classes) + 1:
            raise UserError(f"sensAI group {g} ({names[g]}) has {r} outputs; its group {classes} needs "
                            f"{len(classes) + 1} ([0] + group classes)"
                            + (" or 1 (single-logit, with every group of one class)" if len(classes) == 1 else ""))
    return rows, MULTI


def from_files(paths: list[str], grouping: str | Path, load, example: torch.Tensor,
               form: str = "auto", threads: int = TIMING_THREADS, timer=None) -> tuple["GroupedModel", list[Path]]:
    """The combined module from group model files (a folder or several files) and the
    grouping file; `load(path) -> nn.Module` reads one group model (the front end's safe
    loader); `timer`: grouped_model's. Returns it and the files in group order."""
    groups = load_grouping(grouping)
    check_grouping(groups)
    files = group_files(paths, len(groups))
    models = [load(f) for f in files]
    return grouped_model(models, groups, example, names=[f.name for f in files], form=form, threads=threads,
                         timer=timer), files


# --------------------------------------------------------------------------- combination

class SensaiCombine(nn.Module):
    """evaluate.py GroupedModel.forward's combination of per-group logits into class-ordered
    probabilities (module docstring). Input: (B, N, R) when every head has R rows, else a list
    of (B, rows_g) in group order."""

    def __init__(self, groups: list[list[int]], mode: str):
        super().__init__()
        self.mode = mode
        perm = [c for g in groups for c in g]
        order = [0] * len(perm)
        for j, c in enumerate(perm):
            order[c] = j  # class c is concatenated column j
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)

    def forward(self, logits):
        packed = isinstance(logits, torch.Tensor)
        if self.mode == SINGLE:
            z = logits[:, :, 0] if packed else torch.stack([z[:, 0] for z in logits], dim=1)
            probs = torch.softmax(z, dim=1)  # (B, N) at every batch size, batch 1 included
        elif packed:
            probs = torch.softmax(logits, dim=2)[:, :, 1:].flatten(1)
        else:
            probs = torch.cat([torch.softmax(z, dim=1)[:, 1:] for z in logits], dim=1)
        return probs.index_select(1, self.order)


@dataclass
class Body:
    """Groups `members` computed by `module` (one model, maybe fused): (B, len(members), rows)."""

    members: list[int]
    module: nn.Module
    fused: bool
    width: int = 0  # its output's rows per group (a fused model's may exceed a head's rows)


class FusedBody(nn.Module):
    """A fused model's flat output (B, N * R) -> (B, N, R)."""

    def __init__(self, model: nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, x):
        out = self.model(x)
        return out.reshape(out.shape[0], self.n, -1)


class BranchBody(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).unsqueeze(1)


class GroupedModel(nn.Module):
    """All groups and their combination: input (B, ...) -> (B, n_classes) probabilities in
    class order, as evaluate.py's GroupedModel computes them."""

    def __init__(self, bodies: list[Body], groups: list[list[int]], rows: list[int], mode: str, plan: dict):
        super().__init__()
        self.bodies = nn.ModuleList(b.module for b in bodies)
        self.members = [b.members for b in bodies]
        self.fused = [b.fused for b in bodies]
        self.rows = rows
        self.combine = SensaiCombine(groups, mode)
        self.plan = plan
        self._equal_rows = len(set(rows)) == 1
        # one body computing all groups in order, exactly their rows: its output is the input
        self._whole = (len(bodies) == 1 and self.members[0] == list(range(len(groups)))
                       and self._equal_rows and bodies[0].width == rows[0])

    def forward(self, x):
        parts = [body(x) for body in self.bodies]
        if self._whole:
            return self.combine(parts[0])
        per_group: list = [None] * len(self.rows)
        for part, members in zip(parts, self.members):
            for i, g in enumerate(members):
                per_group[g] = part[:, i, :self.rows[g]]
        return self.combine(torch.stack(per_group, dim=1) if self._equal_rows else per_group)


def grouped_model(models: list[nn.Module], groups: list[list[int]], example: torch.Tensor,
                  fuse: bool = True, names: list[str] | None = None, form: str = "auto",
                  threads: int = TIMING_THREADS, timer=None) -> GroupedModel:
    """The combined module of sensAI group models (`models[g]` for `groups[g]`) in `form`
    (FORMS; `fuse=False` is form "branches"). "auto" builds the fused, hybrid, padded and branch forms
    and keeps the fastest on ONNX Runtime CPU at `example`'s batch with `threads` threads
    (`timer`, default `time_forms`, its `label` attribute naming what it times in the plan;
    where timing fails, the fewest MACs). The plan records the form, how it was chosen and
    every candidate's time and MACs."""
    if form not in FORMS:
        raise OptionError(f"--sensai-form {form!r}: expected one of {', '.join(FORMS)}")
    form = form if fuse else "branches"
    if len(models) != len(groups):
        raise OptionError(f"{len(models)} group models for {len(groups)} groups in the grouping")
    n_classes = check_grouping(groups)
    rows, mode = head_rows(models, groups, example, names)
    timer = timer or time_forms
    clusters = ([[g] for g in range(len(models))] if form in ("branches", "padded")
                else _same_structure(models))
    # per cluster: (members, fused module or None, hybrid module or None, its split layers)
    built, notes, hybrid_notes = [], [], []
    # padded[g]: group g's model with its widths rounded up to whole blocks (fuse_groups of
    # that group alone), for the padded form
    padded: list[nn.Module | None] = [None] * len(models)
    pad_notes: list[str] = []
    if form in ("auto", "padded"):
        for g, model in enumerate(models):
            padded[g], why = fuse_groups([model], example)
            if padded[g] is None:
                pad_notes.append(f"group {g}: {why}")
    for members in clusters:
        if len(members) == 1:
            if form not in ("branches", "padded"):
                notes.append(f"group {members[0]}: no other group of the same structure")
            built.append((members, None, None, []))
            continue
        sub = [models[g] for g in members]
        fused, why = fuse_groups(sub, example)
        if fused is None:
            notes.append(f"groups {members}: {why}")
            built.append((members, None, None, []))
            continue
        hybrid, split, why = (None, [], "")
        if form in ("auto", "hybrid"):
            hybrid, split, why = hybridize(fused, sub, example, threads, timer)
            if why:
                hybrid_notes.append(f"groups {members}: {why}")
        built.append((members, fused, hybrid, split))

    def assemble(kind: str) -> GroupedModel:
        bodies = []
        if kind == "padded":
            bodies = [Body([g], FusedBody(padded[g], 1) if padded[g] is not None else BranchBody(models[g]),
                           False, rows[g]) for g in range(len(models))]
            return GroupedModel(bodies, groups, rows, mode, {}).eval()
        for members, fused, hybrid, _ in built:
            module = {"fused": fused, "hybrid": hybrid or fused, "branches": None}[kind]
            if module is None:
                bodies.extend(Body([g], BranchBody(models[g]), False, rows[g]) for g in members)
                continue
            with torch.no_grad():
                width = module(example).shape[1] // len(members)
            bodies.append(Body(members, FusedBody(module, len(members)), True, width))
        return GroupedModel(bodies, groups, rows, mode, {}).eval()

    candidates = {"branches": assemble("branches")}
    if any(f is not None for _, f, _, _ in built):
        candidates["fused"] = assemble("fused")
    if any(h is not None for _, _, h, _ in built):
        candidates["hybrid"] = assemble("hybrid")
    if any(p is not None for p in padded):
        candidates["padded"] = assemble("padded")
    macs = {k: module_macs(m, example) for k, m in candidates.items()}
    if "padded" in candidates and macs["padded"] == macs["branches"] and form != "padded":
        del candidates["padded"], macs["padded"]
        pad_notes.append("every width already whole blocks: padded = branches (not timed)")
    timings, chosen_by = {}, "requested"
    if form == "auto" and len(candidates) == 1:
        chosen, chosen_by = "branches", "the only form (no groups to fuse)"
    elif form == "auto":
        timings, failure = timer(candidates, example, threads)
        if timings:
            chosen = min(timings, key=timings.get)
            chosen_by = (f"timing: {getattr(timer, 'label', 'ONNX Runtime CPU')}, {threads} threads, "
                         f"batch {example.shape[0]}, median of interleaved runs")
        else:
            chosen = min(candidates, key=lambda k: (macs[k], FORM_PREFERENCE.index(k)))
            chosen_by = f"MACs (timing failed: {failure})"
    else:
        chosen = form if form in candidates else ("fused" if form == "hybrid" and "fused" in candidates
                                                  else "branches")  # padded: no group could be padded
        if chosen != form:
            why = f" ({'; '.join(pad_notes)})" if form == "padded" and pad_notes else ""
            notes.append(f"form {form} not available{why}; {chosen} used")
    grouped = candidates[chosen]
    grouped.plan = {
        "groups": len(groups), "classes": n_classes, "mode": mode, "head_rows": rows,
        "form": chosen, "chosen_by": chosen_by,
        "candidates": {k: {"macs": macs[k], **({"ms": round(timings[k], 3)} if k in timings else {})}
                       for k in candidates},
        "fused": [m for m, f in zip(grouped.members, grouped.fused) if f],
        "branches": [m[0] for m, f in zip(grouped.members, grouped.fused) if not f],
        # the hybrid candidate's per-group layers (whichever form was chosen)
        "hybrid_split_layers": [name for _, _, hybrid, split in built if hybrid is not None for name in split],
        "no_hybrid_because": hybrid_notes,
        "padded": [g for g, p in enumerate(padded) if p is not None] if chosen == "padded" else [],
        "not_padded_because": pad_notes,
        "not_fused_because": notes if form not in ("branches", "padded") else [f"fusion off (form {form})"] + notes,
    }
    return grouped


# --------------------------------------------------------------------------- fusion

def _signature(model: nn.Module) -> tuple:
    return tuple((name, type(m)) for name, m in model.named_modules())


def _same_structure(models: list[nn.Module]) -> list[list[int]]:
    clusters: dict[tuple, list[int]] = {}
    for g, m in enumerate(models):
        clusters.setdefault(_signature(m), []).append(g)
    return sorted(clusters.values())


@dataclass
class _Calls:
    """How the leaf modules of a model are called on one input."""

    order: list[str] = field(default_factory=list)  # parametric leaves in call order
    reads_input: set[str] = field(default_factory=set)  # parametric leaves reading the shared input
    reads_groups: set[str] = field(default_factory=set)  # parametric leaves reading group channels
    input_dims: dict[str, int] = field(default_factory=dict)


def _trace_calls(model: nn.Module, example: torch.Tensor) -> _Calls:
    """Follow the shared input through parameter-free leaves (ReLU, pooling) to the layers
    that read it; every other parametric layer reads per-group channels."""
    calls = _Calls()
    shared = {id(example)}
    keep = [example]  # hold tensors so their ids are not reused
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            first = inputs[0] if inputs else None
            if not isinstance(first, torch.Tensor):
                calls.reads_groups.add(name)
                return
            on_input = id(first) in shared
            has_state = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
            if has_state:
                (calls.reads_input if on_input else calls.reads_groups).add(name)
                if name not in calls.order:
                    calls.order.append(name)
                calls.input_dims[name] = first.dim()
            elif on_input and isinstance(output, torch.Tensor):
                shared.add(id(output))
                keep.append(output)
        return fn

    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    run_with_hooks(model, example, hooks)
    return calls


class GroupedLinear(nn.Module):
    """N Linear layers on the N feature blocks of (B, N * F): one grouped 1x1 convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.reshape(x.shape[0], -1, 1, 1)).flatten(1)


class _NotFusable(Exception):
    pass


def _pad_stack(tensors: list[torch.Tensor], sizes: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
    """Stack tensors into (N, *sizes), each in the leading corner, the rest `fill`."""
    out = torch.full((len(tensors), *sizes), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[(i, *(slice(0, s) for s in t.shape))] = t
    return out


def _block_width(c: int, groups: int) -> int:
    """Each group's channel block: the widest group's width rounded up to ONNX Runtime's NCHWc
    block (passes/choose_widths.py). MLAS runs a grouped conv (groups > 1) in the blocked
    layout only when every group's channels are whole blocks, otherwise im2col (measured, ORT
    1.31, AVX2, 10 groups of 3x3 at 8x8, no spinning: 56 channels 0.85 ms, 64 1.04 ms, 60
    1.52 ms); the padding costs only its MACs. That holds below one block too: the fused
    bottleneck ResNet-56's first stage (groups of 8-12 channels) had been rounded to 4 as a
    plain conv may be, so its grouped convs ran im2col between layout reorders; whole blocks of
    16 took the fused model from 7.4 to 5.8 ms (2 threads, batch 1, Intel Xeon AVX-512,
    2026-12-05). A plain conv (one group: the padded form) runs blocked from 4 channels, so
    below a block it is rounded to 4 only."""
    step = BLOCK if c >= BLOCK or groups > 1 else MIN_MULTIPLE
    return -(-c // step) * step


def _same(layers: list[nn.Module], *attrs: str) -> None:
    for a in attrs:
        values = {repr(getattr(m, a)) for m in layers}
        if len(values) > 1:
            raise _NotFusable(f"{type(layers[0]).__name__} {a} differs between groups ({', '.join(sorted(values))})")


def _fuse_conv(layers: list[nn.Conv2d], reads_input: bool) -> nn.Conv2d:
    _same(layers, "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    if layers[0].groups != 1 or any((m.bias is None) != (layers[0].bias is None) for m in layers):
        raise _NotFusable("grouped convolutions or mixed conv biases inside the group models")
    n = len(layers)
    cout = _block_width(max(m.out_channels for m in layers), n)
    cin = max(m.in_channels for m in layers) if reads_input else _block_width(max(m.in_channels for m in layers), n)
    if reads_input and len({m.in_channels for m in layers}) > 1:
        raise _NotFusable("the first convolutions read different numbers of input channels")
    w = _pad_stack([m.weight.detach() for m in layers], (cout, cin, *layers[0].kernel_size))
    fused = nn.Conv2d(cin if reads_input else n * cin, n * cout, layers[0].kernel_size, layers[0].stride,
                      layers[0].padding, layers[0].dilation, 1 if reads_input else n,
                      bias=layers[0].bias is not None, padding_mode=layers[0].padding_mode)
    fused.weight.data = w.reshape(n * cout, cin, *layers[0].kernel_size)
    if layers[0].bias is not None:
        fused.bias.data = _pad_stack([m.bias.detach() for m in layers], (cout,)).reshape(-1)
    return fused


def _fuse_bn(layers: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    _same(layers, "eps", "affine", "track_running_stats")
    if layers[0].running_mean is None:
        raise _NotFusable("BatchNorm without running statistics")
    n = len(layers)
    c = _block_width(max(m.num_features for m in layers), n)
    fused = nn.BatchNorm2d(n * c, eps=layers[0].eps, affine=layers[0].affine)
    fused.running_mean.data = _pad_stack([m.running_mean for m in layers], (c,)).reshape(-1)
    fused.running_var.data = _pad_stack([m.running_var for m in layers], (c,), fill=1.0).reshape(-1)
    if layers[0].affine:  # padding channels: weight 0, bias 0 -> exactly 0
        fused.weight.data = _pad_stack([m.weight.detach() for m in layers], (c,)).reshape(-1)
        fused.bias.data = _pad_stack([m.bias.detach() for m in layers], (c,)).reshape(-1)
    return fused


def _fuse_linear(layers: list[nn.Linear], reads_input: bool, input_dim: int, in_block: int | None = None) -> nn.Module:
    """Outputs not rounded to blocks: a head's rows are the logits the combination reads.
    `in_block`: each group's input block (what the fused layers before produce)."""
    n = len(layers)
    out_f, in_f = max(m.out_features for m in layers), in_block or max(m.in_features for m in layers)
    if in_f < max(m.in_features for m in layers):
        raise _NotFusable("a Linear reads fewer features than its group models")
    has_bias = layers[0].bias is not None
    if any((m.bias is not None) != has_bias for m in layers):
        raise _NotFusable("mixed Linear biases")
    w = _pad_stack([m.weight.detach() for m in layers], (out_f, in_f))
    b = _pad_stack([m.bias.detach() for m in layers], (out_f,)) if has_bias else None
    if reads_input:
        if len({m.in_features for m in layers}) > 1:
            raise _NotFusable("the first Linear layers read different numbers of input features")
        fused = nn.Linear(in_f, n * out_f, bias=has_bias)
        fused.weight.data = w.reshape(n * out_f, in_f)
        if has_bias:
            fused.bias.data = b.reshape(-1)
        return fused
    if input_dim != 2:
        raise _NotFusable(f"a Linear on {input_dim}-d grouped features")
    conv = nn.Conv2d(n * in_f, n * out_f, 1, groups=n, bias=has_bias)
    conv.weight.data = w.reshape(n * out_f, in_f, 1, 1)
    if has_bias:
        conv.bias.data = b.reshape(-1)
    return GroupedLinear(conv)


def _fuse_leaf(name: str, layers: list[nn.Module], calls: _Calls, in_block: int | None = None) -> nn.Module | None:
    """The fused replacement of one leaf (None: keep group 0's, equal in every group)."""
    first = layers[0]
    stateful = any(True for _ in first.parameters(recurse=False)) or any(True for _ in first.buffers(recurse=False))
    if not stateful:
        _same(layers, "__class__")
        reprs = {m.extra_repr() for m in layers}
        if len(reprs) > 1:
            raise _NotFusable(f"{name} ({type(first).__name__}) differs between groups")
        return None
    if name not in calls.reads_input and name not in calls.reads_groups:
        return None  # never called on the way to the output
    if name in calls.reads_input and name in calls.reads_groups:
        raise _NotFusable(f"{name} reads both the shared input and per-group channels")
    reads_input = name in calls.reads_input
    if type(first) is nn.Conv2d:
        return _fuse_conv(layers, reads_input)
    if type(first) is nn.BatchNorm2d and not reads_input:
        return _fuse_bn(layers)
    if type(first) is nn.Linear:
        return _fuse_linear(layers, reads_input, calls.input_dims.get(name, 2), in_block)
    raise _NotFusable(f"{name} ({type(first).__name__}) has no fused form"
                      + (" on the shared input" if reads_input else ""))


def fuse_groups(models: list[nn.Module], example: torch.Tensor) -> tuple[nn.Module | None, str]:
    """One model computing all `models` (of one structure) side by side: output (B, N * R),
    group g's logits in columns [g*R, g*R + rows_g). (None, why) where that cannot be done
    exactly."""
    try:
        calls = _trace_calls(models[0], example)
        fused = copy.deepcopy(models[0])
        leaves = {name: [dict(m.named_modules())[name] for m in models]
                  for name, mod in models[0].named_modules() if not list(mod.children())}
        late = [name for name in calls.order
                if type(leaves[name][0]) is nn.Linear and name in calls.reads_groups]
        for name, layers in leaves.items():
            if name not in late:
                _replace(fused, name, _fuse_leaf(name, layers, calls))
        fused.eval()  # new BatchNorms start in training mode: a run would update their statistics
        for name in late:  # in call order: each reads what the fused layers before it produce
            width = _input_width(fused, name, example)
            if width % len(models):
                raise _NotFusable(f"{name} reads {width} features, not N equal blocks")
            _replace(fused, name, _fuse_leaf(name, leaves[name], calls, width // len(models)))
        fused.eval()
    except _NotFusable as exc:
        return None, str(exc)
    err = _fused_error(fused, models, example)
    if err is None or not err <= FUSE_RTOL:
        return None, ("the fused model does not run (the forward is not width-agnostic)" if err is None else
                      f"the fused model differs from the group models (rel. error {err:.2e}): "
                      "the forward is not width-agnostic")
    return fused, ""


def _replace(model: nn.Module, name: str, replacement: nn.Module | None) -> None:
    if replacement is not None:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)


class _Reached(Exception):
    pass


def _input_width(model: nn.Module, name: str, example: torch.Tensor) -> int:
    """The last dimension of what `name` receives in `model` (run up to that layer)."""
    seen: list[int] = []

    def stop(module, inputs):
        seen.append(int(inputs[0].shape[-1]))
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            model(example)
    except _Reached:
        pass
    except Exception as exc:  # noqa: BLE001 - the forward does not take the wide tensors
        raise _NotFusable(f"the fused layers before {name} do not run: {type(exc).__name__}") from None
    finally:
        handle.remove()
    if not seen:
        raise _NotFusable(f"{name} is not reached in the fused model")
    return seen[0]


def _fused_error(fused: nn.Module, models: list[nn.Module], example: torch.Tensor) -> float | None:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for x in (example, torch.randn(example.shape, generator=gen)):
        with torch.no_grad():
            try:
                out = fused(x)
                out = out.reshape(out.shape[0], len(models), -1)
            except Exception:  # noqa: BLE001 - the forward does not accept the wide tensors
                return None
            for g, m in enumerate(models):
                ref = m(x)
                if ref.shape[1] > out.shape[2]:
                    return None
                got = out[:, g, :ref.shape[1]]
                scale = float(ref.abs().max()) or 1.0
                err = float((got - ref).abs().max()) / scale
                if not np.isfinite(err):
                    return float("inf")
                worst = max(worst, err)
    return worst


# --------------------------------------------------------------------------- hybrid form and choice

class SplitConv(nn.Module):
    """One layer of the hybrid form: each group's own conv (and its own BatchNorm right after
    it) on the group's real input channels, sliced out of the wide tensor; each output
    zero-padded to the block width the fused layers around it use, then concatenated. The
    same numbers as the group's own layers (no padding MACs), at the price of N small ops."""

    def __init__(self, convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d] | None, in_block: int, out_block: int):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns) if bns else None
        self.in_block, self.out_block = in_block, out_block

    def forward(self, x):
        outs = []
        for g, conv in enumerate(self.convs):
            start = g * self.in_block
            y = conv(x[:, start:start + conv.in_channels])
            if self.bns is not None:
                y = self.bns[g](y)
            if y.shape[1] < self.out_block:
                y = nn.functional.pad(y, (0, 0, 0, 0, 0, self.out_block - y.shape[1]))
            outs.append(y)
        return torch.cat(outs, dim=1)


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Conv2d -> the BatchNorm2d that reads its output, where both are called once."""
    out_of: dict[int, str] = {}
    counts: dict[str, int] = {}
    pairs: dict[str, str] = {}
    keep = []

    def hook(name):
        def fn(module, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            keep.append(output)
            if type(module) is nn.Conv2d:
                out_of[id(output)] = name
            elif type(module) is nn.BatchNorm2d and inputs and id(inputs[0]) in out_of:
                pairs[out_of[id(inputs[0])]] = name
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d)]
    run_with_hooks(model, example, hooks)
    return {c: b for c, b in pairs.items() if counts[c] == 1 and counts[b] == 1}


def _layer_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    """(input shape, output shape) of each named leaf on `example`."""
    shapes: dict[str, tuple] = {}

    def record(name):
        def fn(module, inputs, output):  # returns None: the output stays as it is
            shapes.setdefault(name, (tuple(inputs[0].shape), tuple(output.shape)))
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    run_with_hooks(model, example, hooks)
    return shapes


def hybridize(fused: nn.Module, models: list[nn.Module], example: torch.Tensor, threads: int = TIMING_THREADS,
              timer=None) -> tuple[nn.Module | None, list[str], str]:
    """The hybrid form of a fused model: each grouped conv (with the BatchNorm after it) that
    runs faster per group is replaced by a SplitConv. Per layer, both forms are timed alone
    on ONNX Runtime at the layer's input shape (`timer`, default `time_forms`, fastest run); where that
    fails, the MAC rule (SPLIT_MAC_RATIO, SPLIT_MIN_GROUP_MACS). Returns (module, split
    layers, "") or (None, [], why) when no layer is faster split or the result is not exact."""
    timer = timer or time_forms
    n = len(models)
    originals = dict(models[0].named_modules())
    convs = [name for name, m in fused.named_modules()  # not a grouped Linear's conv: no such layer in a group
             if type(m) is nn.Conv2d and m.groups == n > 1 and type(originals.get(name)) is nn.Conv2d]
    if not convs:
        return None, [], "no grouped convolution"
    pairs = _conv_bn_pairs(models[0], example)
    shapes = _layer_shapes(fused, convs, example)
    split: list[str] = []
    layers = {name: [m.get_submodule(name) for m in models] for name in convs}
    for name in convs:
        wide = fused.get_submodule(name)
        out_shape = shapes[name][1]
        own = layers[name]
        spatial = out_shape[2] * out_shape[3] if len(out_shape) == 4 else 1
        k = wide.kernel_size[0] * wide.kernel_size[1]
        real = sum(c.in_channels * c.out_channels for c in own) * k * spatial
        padded = wide.in_channels // n * wide.out_channels * k * spatial
        if padded == real:
            continue  # nothing to save
        bn = pairs.get(name)
        grouped_layer = nn.Sequential(wide, fused.get_submodule(bn)) if bn else wide
        split_layer = _split_layer(name, bn, fused, models)
        # minimum, not median: a layer's runs take ~1 ms, and on a busy host a median of so
        # few is mostly other processes' time slices (its layer choices varied run to run)
        timings, _ = timer({"grouped": grouped_layer, "split": split_layer}, torch.randn(shapes[name][0]),
                           threads, runs=10, settle_s=0.02, stat=np.min)
        if timings:
            if timings["split"] < timings["grouped"]:
                split.append(name)
        elif padded > SPLIT_MAC_RATIO * real and real / n >= SPLIT_MIN_GROUP_MACS:
            split.append(name)
    if not split:
        return None, [], "no layer is faster per group"
    hybrid = copy.deepcopy(fused)
    for name in split:
        bn = pairs.get(name)
        _replace(hybrid, name, _split_layer(name, bn, fused, models))
        if bn:
            _replace(hybrid, bn, nn.Identity())
    hybrid.eval()
    err = _fused_error(hybrid, models, example)
    if err is None or not err <= FUSE_RTOL:
        return None, [], "the per-group layers do not reproduce the group models (a conv's output read " \
                         "by more than its BatchNorm?)"
    return hybrid, split, ""


def _split_layer(name: str, bn: str | None, fused: nn.Module, models: list[nn.Module]) -> SplitConv:
    n = len(models)
    wide = fused.get_submodule(name)
    return SplitConv([copy.deepcopy(m.get_submodule(name)) for m in models],
                     [copy.deepcopy(m.get_submodule(bn)) for m in models] if bn else None,
                     wide.in_channels // n, wide.out_channels // n).eval()


def module_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers a forward on `example` calls."""
    total = [0]

    def hook(m, inputs, output):
        if type(m) is nn.Conv2d:
            total[0] += output.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += output.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    run_with_hooks(model, example, hooks)
    return int(total[0])


def time_forms(modules: dict[str, nn.Module], example: torch.Tensor, threads: int = TIMING_THREADS,
               runs: int = TIMING_RUNS, settle_s: float = 0.1, stat=np.median,
               prepare=None) -> tuple[dict[str, float], str]:
    """`stat` (median) of the ms per module on ONNX Runtime CPU (captured as the export
    captures, then `prepare(onnx_model)` if given: the export's target pipeline, api.py;
    default spinning, `threads` threads), timed in interleaved blocks; ({}, why) where they
    cannot be timed."""
    from ..benchmark import time_sessions
    from ..capture import capture
    from ..verify import make_session

    prepare = prepare or (lambda model: model)
    try:
        sessions = {k: make_session(prepare(capture(m.eval(), example)), threads=threads)
                    for k, m in modules.items()}
        feed = [{"input": example.numpy()}]
        times = time_sessions(sessions, {k: feed for k in sessions}, runs=runs, block=5, settle_s=settle_s)
    except Exception as exc:  # noqa: BLE001 - capture or ONNX Runtime failing here only costs the timing
        return {}, first_line(exc)
    return {k: float(stat(t)) for k, t in times.items()}, ""


# --------------------------------------------------------------------------- APoZ pruning

APOZ_ZERO = 0.005  # apoz_policy.py apoz_scoring: |a| <= 0.005 counts as zero
APOZ_THRESHOLD = 73.0  # apoz_policy.py generate_pruned_candidates (CIFAR): APoZ % > 73 ...
MEAN_THRESHOLD = 0.01  # ... and mean |a| < 0.01 (candidates with mean |a| >= 0.01 are kept)
APOZ_BATCH = 1000  # get_prune_candidates.py: DataLoader(batch_size=1000) over the group's images


def relu_scores(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per ReLU call (in call order, as apoz_policy.py ActivationRecord hooks every module
    named ReLU): (APoZ %, mean |a|) per channel, each the mean over batches of the batch's
    mean over samples and positions (the seed averages batch scores, unweighted)."""
    scores: list[list[np.ndarray]] = []
    call = [0]

    def hook(module, inputs, output):
        if output.dim() != 4:
            raise UserError(f"sensai-prune: a ReLU output of shape {tuple(output.shape)}; the seed's rule "
                            "scores (N, C, H, W) maps")
        a = output.detach().abs()
        apoz = (a <= APOZ_ZERO).float().mean(dim=(0, 2, 3)).mul(100).numpy()
        mean = a.mean(dim=(0, 2, 3)).numpy()
        if call[0] == len(scores):
            scores.append([apoz * 0, mean * 0])
        scores[call[0]][0] += apoz
        scores[call[0]][1] += mean
        call[0] += 1

    model.eval()
    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__ == "ReLU"]
    try:
        with torch.no_grad():
            for x in batches:
                call[0] = 0
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(apoz / len(batches), mean / len(batches)) for apoz, mean in scores]


def prune_candidates(scores, apoz_threshold: float = APOZ_THRESHOLD,
                     mean_threshold: float = MEAN_THRESHOLD) -> list[list[int]]:
    """Channels to prune per ReLU call: APoZ above the threshold and mean |a| below the other."""
    return [sorted(int(i) for i in np.nonzero((apoz > apoz_threshold) & ~(mean >= mean_threshold))[0])
            for apoz, mean in scores]


def _keep(n: int, drop: list[int]) -> list[int]:
    drop_set = set(drop)
    keep = [i for i in range(n) if i not in drop_set]
    if not keep:  # a layer must keep a channel (the seed would build an empty conv)
        keep = [0]
    return keep


def _slice_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, keep: list[int]) -> None:
    conv.weight.data = conv.weight.data[keep].clone()
    if conv.bias is not None:
        conv.bias.data = conv.bias.data[keep].clone()
    conv.out_channels = len(keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, name)
        if t is not None:
            t.data = t.data[keep].clone()
    bn.num_features = len(keep)


def _slice_in(conv: nn.Conv2d, keep: list[int]) -> None:
    conv.weight.data = conv.weight.data[:, keep].clone()
    conv.in_channels = len(keep)


def prune_head(linear: nn.Linear, group: list[int], single: bool, generator: torch.Generator) -> None:
    """prune_utils/layer_prune.py prune_output_linear_layer_: rows [0] + group (row 0's weight
    re-drawn from N(0, 0.01), its bias kept), or the group's one row (single-logit)."""
    rows = list(group) if single else [0] + list(group)
    linear.weight.data = linear.weight.data[rows].clone()
    linear.bias.data = linear.bias.data[rows].clone()
    if not single:
        linear.weight.data[0] = torch.randn(linear.in_features, generator=generator) * 0.01
    linear.out_features = len(rows)


def _vgg_parts(model: nn.Module):
    feats, head = getattr(model, "features", None), getattr(model, "classifier", None)
    if not isinstance(feats, nn.Sequential) or not isinstance(head, nn.Linear):
        return None
    convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
    if not convs or any(not isinstance(feats[i + 1], nn.BatchNorm2d) for i in convs if i + 1 < len(feats)):
        return None
    return feats, head, convs


def _bottlenecks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if all(isinstance(getattr(m, a, None), nn.Conv2d) for a in ("conv1", "conv2", "conv3"))
            and all(isinstance(getattr(m, a, None), nn.BatchNorm2d) for a in ("bn1", "bn2"))]


def prune_group_model(model: nn.Module, candidates: list[list[int]], group: list[int], single: bool,
                      generator: torch.Generator) -> nn.Module:
    """A copy of `model` pruned as prune_and_get_model.py does: VGG (`features` +
    `classifier`, `prune_vgg`): every conv's candidate outputs (its BN, the next conv's inputs,
    the classifier's inputs after the last conv); bottleneck ResNet (`prune_resnet`): only
    block-internal widths, candidates indexed per ReLU call (stem 0, then three calls per
    block: after bn1, after bn2, after the add). Then the head (`prune_head`). Where the rule
    would remove every channel of a layer, channel 0 stays (the seed would build an empty
    layer)."""
    model = copy.deepcopy(model)
    vgg = _vgg_parts(model)
    if vgg is not None:
        feats, head, convs = vgg
        if len(candidates) != len(convs):
            raise UserError(f"sensai-prune: {len(candidates)} ReLU calls for {len(convs)} convolutions in "
                            "features; the VGG rule needs Conv-BN-ReLU layers")
        for k, i in enumerate(convs):
            width = feats[i].out_channels
            keep = _keep(width, candidates[k])
            _slice_out(feats[i], feats[i + 1], keep)
            if k + 1 < len(convs):
                _slice_in(feats[convs[k + 1]], keep)
            else:  # classifier inputs: params_per_input_channel per channel, channel-major
                if head.in_features % width:
                    raise UserError(f"sensai-prune: the classifier's {head.in_features} inputs are not a "
                                    f"multiple of the last conv's {width} channels")
                per = head.in_features // width
                cols = [c * per + j for c in keep for j in range(per)]
                head.weight.data = head.weight.data[:, cols].clone()
                head.in_features = len(cols)
        prune_head(head, group, single, generator)
        return model
    blocks = _bottlenecks(model)
    fc = getattr(model, "fc", None)
    if blocks and isinstance(fc, nn.Linear):
        if len(candidates) != 1 + 3 * len(blocks):
            raise UserError(f"sensai-prune: {len(candidates)} ReLU calls for {len(blocks)} bottleneck blocks; "
                            "the ResNet rule needs a stem ReLU and three per block")
        for b, block in enumerate(blocks):
            keep = _keep(block.conv1.out_channels, candidates[1 + 3 * b])
            _slice_out(block.conv1, block.bn1, keep)
            _slice_in(block.conv2, keep)
            keep = _keep(block.conv2.out_channels, candidates[2 + 3 * b])
            _slice_out(block.conv2, block.bn2, keep)
            _slice_in(block.conv3, keep)
        prune_head(fc, group, single, generator)
        return model
    raise UserError(f"sensai-prune: {type(model).__name__} is neither of sensAI's CIFAR layouts: a VGG "
                    "(`features` Conv-BN-ReLU + a Linear `classifier`) or a bottleneck ResNet (blocks with "
                    "conv1-3/bn1-2, a Linear `fc`)")


def prune_groups(model: nn.Module, groups: list[list[int]], images: np.ndarray, labels: np.ndarray,
                 apoz_threshold: float = APOZ_THRESHOLD, mean_threshold: float = MEAN_THRESHOLD,
                 batch_size: int = APOZ_BATCH, seed: int = 0) -> list[tuple[nn.Module, list[list[int]]]]:
    """Per group (get_prune_candidates.py + prune_and_get_model.py): score the ReLUs on the
    group's own images (those whose label is in the group, in file order, in batches of
    `batch_size`), prune the candidates, cut the head. Returns (pruned model, candidates).
    The images are used as given: the seed scores augmented training images (its CIFAR
    training-set wrapper crops and flips at random), which the caller may do beforehand."""
    check_grouping(groups)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise UserError(f"sensai-prune: {len(images)} images but {len(labels)} labels")
    single = all(len(g) == 1 for g in groups)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for g, group in enumerate(groups):
        idx = np.nonzero(np.isin(labels, group))[0]
        if not len(idx):
            raise UserError(f"sensai-prune: no sample image of group {g} (classes {group})")
        batches = [torch.from_numpy(np.ascontiguousarray(images[idx[i:i + batch_size]], dtype=np.float32))
                   for i in range(0, len(idx), batch_size)]
        try:
            scores = relu_scores(model, batches)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - the images do not fit the model
            raise UserError(f"sensai-prune: the model does not run on the images of shape "
                            f"{tuple(images.shape[1:])}: {first_line(exc)}") from None
        candidates = prune_candidates(scores, apoz_threshold, mean_threshold)
        out.append((prune_group_model(model, candidates, group, single, generator), candidates))
    return out

"""Slimmable networks (Joslim, seed 003): one width of a weight-shared network, as a physically
narrow dense model.

Which models: any module with the seed's `DynModel` interface (`channel_space`,
`set_real_ch`) whose family is known: gate2deploy.models.slimmable's `resnet20`..`resnet50`
and `mobilenetv2`, and the seed's own `slim_resnet*` / `slim_mobilenetv2` /
`slim_mobilenetv3_large` classes (`--model model.slim_resnet:slim_resnet20` with a Joslim
checkout on PYTHONPATH; MobileNetV3 has no built-in equivalent yet, its decode is v2's). A slimmable model
always goes through this importer; without a width flag it exports at full width.

Choosing the width (one of):
- `--width w`: the uniform vector `[w] * search_dim` (Joslim's eval_checkpoints.py "uniform").
- `--width-vector wm.json`: a JSON list of `search_dim` multipliers, each in (0, 1].
- `--population N`: the N-th entry (0-based) of the checkpoint's `population_data`; its
  `filters` (the channels Joslim decoded when it sampled the entry) are used as stored, after
  checking they fit the model. `gate2deploy info` lists the entries (loss, FLOPs, ratio).

Decoding a width vector (the seed's `decode_wm` + `decode_ch`, model/slim_resnet.py and
model/slim_mbv2.py, class methods of SlimResNet / SlimMobileNetV2):
- every search dimension i gives `int(wm[i] * channel_space_i)` channels (truncation);
- ResNet: the stem takes `int(wm[0] * channel_space[0][0])` (CIFAR: the same multiplier and
  count as stage 1's residual width; bottleneck ResNets: stage 1's first entry is the stem's
  and is not a stage width). Each stage lists its residual width first, then one inner width
  per block;
- MobileNetV2: the stem, the depthwise-separable block's output, then per stage its output
  (residual) width first and each block's expanded width; the stem and the separable block
  both read wm[0] (SlimMobileNetV2.decode_wm does not advance its index past the stem), so
  the vector's last entry (of 24) is never read; the last 1x1 conv (1280) and the classifier
  keep their full width;
- per stage, from the first residual stage on, the residual width is raised to at least the
  previous stage's (the zero-padded shortcut cannot narrow), and the stage expands to
  `[inner_0, residual, inner_1, residual, ...]`, two counts per block, which `set_real_ch`
  applies (first k channels of every layer, depthwise groups = width).
A count of 0 anywhere is refused (it would be a layer with no channels).

From widths to the deployed model, decision: the narrow model is built directly, not as
static ChannelMask masks folded away. The seed's widths are "the first k channels", known
before capture, so each SlimConv2d becomes an nn.Conv2d holding `W[:out_k, :in_k]` (groups =
the active groups, no bias: the seed never applies it) and each SlimBN an nn.BatchNorm2d of
the first k entries (`narrow_copy`). Exact by construction; the CIFAR zero-padded shortcut
(a channel Pad/Concat) needs no fold support. The narrow model is checked against the
slimmable model's own forward at that width before anything else runs (the report's
`narrow_vs_slimmable_max_rel_err`), then captured and verified like any export.

BatchNorm statistics (the seed's eval_checkpoints.py `Joslim.eval`): per width, reset the
running statistics, set momentum None (cumulative average), run training-mode forward
passes, then evaluate. Here the passes are over `--sample-inputs` (an already preprocessed
tensor), in consecutive batches of `--recalibration-batch-size` (default min(32, M): 32 is the
seed's eval batch size), the first `--recalibration-batches` of them (default all; a last
incomplete batch is dropped, as the seed's loader does with drop_last). Only the BN layers
are in training mode (Dropout stays off, deterministic; in MobileNetV2 it follows the last BN
anyway). Without sample inputs the checkpoint's statistics, sliced to the width, are kept:
a warning on stderr and in the report (`bn_statistics`, `warnings`), because Joslim's shared
statistics do not match any one width.

MACs in the seed's scope (`conv_macs`): `DynModel.get_flops_from_wm` (model/dyn_model.py)
counts every SlimConv2d (not a plain nn.Conv2d such as MobileNetV3's last 1x1), `k_h * k_w * in * out * H_out * W_out / groups`, per sample, at the
training input size; no Linear layer, no BN, pooling or adds. The report gives it for the
exported input shape; for a population entry the checkpoint's own `flops` is listed beside it.
"""
from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch
from torch import nn

from ..errors import OptionError, UserError, first_line

FAMILIES = ("resnet", "mobilenetv2", "mobilenetv3")  # v3: the seed's own SlimMobileNetV3 class only
DEFAULT_RECALIBRATION_BATCH = 32  # eval_checkpoints.py --batch_size default


def family(model: nn.Module) -> str | None:
    """One of FAMILIES for a slimmable model of a known family, else None."""
    if not is_slimmable(model):
        return None
    own = getattr(model, "family", None)
    if own in FAMILIES:
        return own
    names = [c.__name__ for c in type(model).__mro__]
    if "SlimResNet" in names:
        return "resnet"
    if "SlimMobileNetV2" in names:
        return "mobilenetv2"
    if "SlimMobileNetV3" in names:  # model/slim_mbv3.py: the same decode_wm / decode_ch as v2
        return "mobilenetv3"
    return None


def is_slimmable(model: nn.Module) -> bool:
    return hasattr(model, "channel_space") and callable(getattr(model, "set_real_ch", None))


def _is_bottleneck(model: nn.Module) -> bool:
    block = getattr(model, "block", None)
    return getattr(block, "expansion", 1) != 1


def search_space(model: nn.Module) -> list[int]:
    """The full channel count of each channel_space entry, flattened."""
    out = []
    for entry in model.channel_space:
        out += list(entry) if isinstance(entry, (list, tuple)) else [entry]
    return [int(c) for c in out]


def search_dim(model: nn.Module) -> int:
    """The width vector's length (the seed's `search_dim`)."""
    dim = getattr(model, "search_dim", None)
    return int(dim) if isinstance(dim, int) else len(search_space(model))


def _slots(model: nn.Module) -> list:
    """(width-vector index, full channels) per count, grouped as the seed's decode_wm groups
    them before decode_ch. Single-count entries (the stems) take the multiplier of the index
    the next entry starts at: ResNet's decode_wm reads wm[0] for its stem, MobileNetV2's
    does not advance its index past the stem (so its separable block shares wm[0] and the
    vector's last entry is never read)."""
    space = model.channel_space
    grouped: list = []
    i = 0
    if family(model) == "resnet":
        grouped.append((0, int(space[0][0])))
        for si, stage in enumerate(space):
            local = []
            for ci, c in enumerate(stage):
                if not (si == 0 and ci == 0 and _is_bottleneck(model)):  # bottleneck: the stem's entry
                    local.append((i, int(c)))
                i += 1
            grouped.append(local)
    else:
        for entry in space:
            if isinstance(entry, (list, tuple)):
                grouped.append([(i + j, int(c)) for j, c in enumerate(entry)])
                i += len(entry)
            else:
                grouped.append((i, int(entry)))
    return grouped


def _expand(grouped: list, first_residual_stage: int) -> list:
    """The seed's decode_ch: residual widths non-decreasing from stage to stage, each stage
    expanded to [inner, residual] per block."""
    real: list = []
    prev = 0
    for idx, stage in enumerate(grouped):
        if idx < first_residual_stage:
            real.append(stage)
            continue
        residual = max(stage[0], prev)
        real.append([c for inner in stage[1:] for c in (inner, residual)])
        prev = residual
    return real


def decode(model: nn.Module, wm) -> list:
    """Per-layer channel counts (set_real_ch's argument) of width vector `wm`."""
    slots = _slots(model)

    def count(slot):
        return int(float(wm[slot[0]]) * slot[1])
    grouped = [[count(s) for s in g] if isinstance(g, list) else count(g) for g in slots]
    real = _expand(grouped, 1 if family(model) == "resnet" else 2)
    if min(_flat(real)) < 1:
        flat_slots = [s for g in slots for s in (g if isinstance(g, list) else [g])]
        dim, channels = next(s for s in flat_slots if count(s) < 1)
        raise OptionError(f"width {float(wm[dim]):g} of search dimension {dim} ({channels} channels) decodes to "
                          f"0 channels; the smallest width that keeps a channel there is "
                          f"{_smallest_width_text(channels)}")
    return real


def _smallest_width_text(channels: int) -> str:
    """1 / channels to 4 significant digits, rounded up so that the width shown decodes to a
    channel (int(w * channels) >= 1; 1/144 to 4 digits, 0.006944, decodes to 0)."""
    w = 1 / channels
    step = 10.0 ** (math.floor(math.log10(w)) - 3)
    shown = float(f"{w:.4g}")
    while int(shown * channels) < 1:
        shown = float(f"{shown + step:.4g}")
    return f"{shown:.4g}"


def _flat(real) -> list[int]:
    out = []
    for entry in real:
        out += list(entry) if isinstance(entry, (list, tuple)) else [entry]
    return out


def check_real_ch(model: nn.Module, real, what: str) -> list:
    """`real` (e.g. a population entry's filters) as plain ints, if it has the structure of the
    model's full-width decode, every count in 1..full and residual widths that shortcuts can
    pad (non-decreasing)."""
    full = decode(model, [1.0] * search_dim(model))

    def fail(reason):
        raise UserError(f"{what} do not fit the model: {reason}")
    if not isinstance(real, (list, tuple)) or len(real) != len(full):
        fail(f"expected {len(full)} groups of channel counts")
    clean = []
    for gi, (got, ref) in enumerate(zip(real, full)):
        if isinstance(ref, list):
            if not isinstance(got, (list, tuple)) or len(got) != len(ref):
                fail(f"group {gi} should list {len(ref)} counts")
            values = list(got)
        else:
            if isinstance(got, (list, tuple)):
                fail(f"group {gi} should be one count")
            values = [got]
        for v, limit in zip(values, ref if isinstance(ref, list) else [ref]):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= int(v) <= limit:
                fail(f"group {gi} has {v!r}, not a channel count in 1..{limit}")
        ints = [int(v) for v in values]
        clean.append(ints if isinstance(ref, list) else ints[0])
    if family(model) == "resnet":
        residuals = [stage[-1] for stage in clean[1:]]
        if any(b < a for a, b in zip(residuals, residuals[1:])):
            fail(f"residual widths {residuals} decrease from a stage to the next (the shortcut cannot narrow)")
    return clean


def parse_width(value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"--width {value!r} is not a number") from None
    if not 0 < w <= 1:  # also refuses NaN
        raise OptionError(f"--width {value!r} is outside (0, 1]")
    return w


def read_width_vector(path: str, dim: int) -> list[float]:
    from ..fileio import read_json

    data = read_json(path, "--width-vector")
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise OptionError(f"--width-vector {path} must hold a JSON list of numbers")
    if len(data) != dim:
        raise OptionError(f"--width-vector {path} has {len(data)} entries; the model has {dim} search dimensions")
    bad = [(i, v) for i, v in enumerate(data) if not 0 < float(v) <= 1]
    if bad:
        raise OptionError(f"--width-vector {path}: entry {bad[0][0]} = {bad[0][1]!r} is outside (0, 1]")
    return [float(v) for v in data]


def population(meta: dict) -> list[dict]:
    """The checkpoint's population entries as {index, loss, flops, ratio, filters}."""
    entries = meta.get("population_data")
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise UserError("the checkpoint's population_data is not a list")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "filters" not in e:
            raise UserError(f"the checkpoint's population_data[{i}] has no 'filters'")
        out.append({"index": i, "loss": _number(e.get("loss")), "flops": _number(e.get("flops")),
                    "ratio": _number(e.get("ratio")), "filters": e["filters"]})
    return out


def _number(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else None


def parse_population_index(value, size: int) -> int:
    try:
        index = int(str(value))
    except ValueError:
        raise OptionError(f"--population {value!r} is not an entry index") from None
    if size == 0:
        raise OptionError("--population: the checkpoint holds no population_data entries")
    if not 0 <= index < size:
        raise OptionError(f"--population {index} is out of range: the checkpoint holds {size} entries (0..{size - 1})")
    return index


# --- the narrow model ------------------------------------------------------------------------

def _is_slim_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and hasattr(m, "active_in_ch") and hasattr(m, "active_out_ch")


def _is_slim_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and hasattr(m, "active_ch")


def narrow_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` at its active widths in which every slimmable conv / BN is a plain
    nn.Conv2d / nn.BatchNorm2d holding only its first channels."""
    net = copy.deepcopy(model)
    for name, m in list(net.named_modules()):
        if _is_slim_conv(m):
            out_k, in_k, groups = int(m.active_out_ch), int(m.active_in_ch), int(getattr(m, "active_groups", m.groups))
            w = m.weight.detach()[:out_k, :in_k].clone()
            new = nn.Conv2d(w.shape[1] * groups, out_k, tuple(w.shape[2:]), m.stride, m.padding, m.dilation,
                            groups, bias=False)
            new.weight.data.copy_(w)
            new.narrowed_from_slimmable = True  # conv_macs counts these (the seed's FLOPs scope)
        elif _is_slim_bn(m):
            k = int(m.active_ch)
            new = nn.BatchNorm2d(k, eps=m.eps, momentum=m.momentum)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, attr).data.copy_(getattr(m, attr).detach()[:k])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, new)
    return net.eval()


def recalibrate(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Joslim's per-width BN recalibration (eval_checkpoints.py): reset, cumulative average
    (momentum None) over training-mode passes of the BN layers. Returns the BN count."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()
    return len(bns)


def _counted(m: nn.Module) -> bool:
    """The seed's FLOPs scope: SlimConv2d layers (a plain nn.Conv2d of the seed's, such as
    MobileNetV3's last 1x1, is not counted)."""
    return _is_slim_conv(m) or getattr(m, "narrowed_from_slimmable", False)


def conv_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs per sample of the slimmable convolutions at their active widths, at the example's
    size: k_h * k_w * in/groups * out * H_out * W_out each (DynModel.get_flops_from_wm)."""
    total = [0]

    def hook(m, inputs, out):
        x = inputs[0]
        groups = int(getattr(m, "active_groups", m.groups))
        total[0] += int(np.prod(m.weight.shape[2:])) * (x.shape[1] // groups) * out.shape[1] * int(np.prod(out.shape[2:]))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d) and _counted(m)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def recalibration_batches(samples: np.ndarray, batch_size: int | None, count: int | None):
    """Consecutive full batches of `samples` (M, ...) for recalibration, and the batch size."""
    if batch_size is not None and batch_size < 1:
        raise OptionError(f"--recalibration-batch-size {batch_size} must be at least 1")
    if count is not None and count < 1:
        raise OptionError(f"--recalibration-batches {count} must be at least 1")
    size = batch_size or min(DEFAULT_RECALIBRATION_BATCH, len(samples))
    if size > len(samples):
        raise OptionError(f"--recalibration-batch-size {size} is more than the {len(samples)} sample inputs")
    batches = [torch.from_numpy(np.ascontiguousarray(samples[i:i + size]))
               for i in range(0, len(samples) - size + 1, size)]
    if count is not None:
        if count > len(batches):
            raise OptionError(f"--recalibration-batches {count}: the {len(samples)} sample inputs make only "
                              f"{len(batches)} batches of {size}")
        batches = batches[:count]
    return batches, size


def select_width(model: nn.Module, opts, meta: dict | None, example: torch.Tensor,
                 samples: np.ndarray | None = None) -> tuple[nn.Module, dict]:
    """The narrow model at the width `opts` chooses, its BatchNorm statistics recalibrated on
    `samples` (M, *example.shape[1:]) when given, and the report section. `meta`: the
    checkpoint's non-tensor entries (population_data)."""
    fam = family(model)
    if fam is None:
        raise UserError(f"{type(model).__name__} has channel_space/set_real_ch but is not a slimmable family "
                        f"gate2deploy knows ({', '.join(FAMILIES)})")
    chosen = [n for n in ("width", "width_vector", "population") if getattr(opts, n, None) is not None]
    if len(chosen) > 1:
        raise OptionError(f"--{chosen[0].replace('_', '-')} and --{chosen[1].replace('_', '-')} both choose the width; give one")
    dim = search_dim(model)
    entries = population(meta or {})
    section: dict = {"family": fam, "search_dim": dim, "population_size": len(entries)}
    if opts.population is not None:
        index = parse_population_index(opts.population, len(entries))
        entry = entries[index]
        real = check_real_ch(model, entry["filters"], f"population entry {index}'s filters")
        section["selection"] = {"kind": "population", "index": index, "loss": entry["loss"],
                                "checkpoint_flops": entry["flops"], "ratio": entry["ratio"]}
    elif opts.width_vector is not None:
        wm = read_width_vector(opts.width_vector, dim)
        real = decode(model, wm)
        section["selection"] = {"kind": "vector", "path": str(opts.width_vector), "width_vector": wm}
    else:
        w = 1.0 if opts.width is None else parse_width(opts.width)
        real = decode(model, [w] * dim)
        section["selection"] = {"kind": "uniform", "width": w}
    section["channels"] = real

    samples_path = getattr(opts, "sample_inputs", None)
    batches = None
    if samples is None and (opts.recalibration_batches is not None or opts.recalibration_batch_size is not None):
        raise OptionError("--recalibration-batches / --recalibration-batch-size need --sample-inputs to recalibrate on")
    if samples is not None:
        batches, size = recalibration_batches(samples, opts.recalibration_batch_size, opts.recalibration_batches)

    model.eval()
    try:
        model.set_real_ch(copy.deepcopy(real))
        with torch.no_grad():
            reference = model(example)
    except Exception as exc:  # noqa: BLE001 - e.g. hand-edited filters whose residual widths disagree
        first = first_line(exc)
        raise UserError(f"the model does not run at channels {real}: {first}") from None
    narrow = narrow_copy(model)
    leftover = [n for n, m in narrow.named_modules() if _is_slim_conv(m) or _is_slim_bn(m)]
    if leftover:
        raise UserError(f"slimmable layer {leftover[0]} was not narrowed")
    with torch.no_grad():
        got = narrow(example)
    scale = float(reference.abs().max()) or 1.0
    section["narrow_vs_slimmable_max_rel_err"] = float((reference - got).abs().max()) / scale
    if not section["narrow_vs_slimmable_max_rel_err"] <= 1e-5:
        raise UserError(f"the narrow model differs from {type(model).__name__}'s own forward at this width "
                        f"(max rel err {section['narrow_vs_slimmable_max_rel_err']:.3g}); "
                        "its set_real_ch and the decoded channels disagree")

    warnings = []
    if batches is not None:
        n_bn = recalibrate(narrow, batches)
        section["bn_statistics"] = (f"recalibrated ({n_bn} BatchNorm layers, cumulative average over "
                                    f"{len(batches)} batches of {size} from {samples_path})")
        section["recalibration"] = {"batches": len(batches), "batch_size": size, "sample_inputs": str(samples_path)}
    else:
        section["bn_statistics"] = "checkpoint (sliced to the width, not recalibrated)"
        warnings.append("no --sample-inputs: the BatchNorm statistics are the checkpoint's, sliced to this width; "
                        "Joslim recalibrates them per width, so accuracy may be far off (give --sample-inputs)")
    for text in warnings:
        print(f"warning: {text}", file=sys.stderr)
    section["warnings"] = warnings

    section["conv_macs"] = conv_macs(narrow, example)
    model.set_real_ch(decode(model, [1.0] * dim))
    section["conv_macs_full_width"] = conv_macs(model, example)
    section["conv_macs_ratio"] = section["conv_macs"] / section["conv_macs_full_width"]
    section["macs_scope"] = ("per sample, every Conv2d at the export's input size (Joslim's get_flops_from_wm "
                             "scope: no Linear layers)")
    section["population"] = [{k: e[k] for k in ("index", "loss", "flops", "ratio")} for e in entries]
    return narrow, section


def uniform_sweep(text: str) -> list[float]:
    """`--width-sweep 0.25,0.5,...` as checked widths."""
    values = [v for v in str(text).split(",") if v.strip()]
    if not values:
        raise OptionError("--width-sweep needs comma-separated widths, e.g. 0.25,0.5,0.75,1.0")
    return [parse_width(v) for v in values]


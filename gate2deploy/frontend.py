"""Front end shared by the subcommands: checkpoint + flags -> PyTorch model with its masks.

`build_gated_model` (options: gate2deploy.options.ModelOptions) loads the checkpoint (safe by
default), builds the architecture, recognises the mask sources and attaches them:
- gate2deploy.nn modules inside the user's model: nothing to do, they capture themselves;
- the seeds' own gated layer classes (dnn-gating CG/PG/PACT, PyTorch-FBS): replaced by
  gate2deploy's equivalents (importers/seed_layers.py), or named as not lowered;
- Gator checkpoints (recognised from their `forward_hooks.*.gating_module.*` keys);
- network slimming from BatchNorm scales (`--netslim-density`);
- slimmable networks (Joslim): one width (`--width`, `--width-vector`, `--population`) as a
  physically narrow model with recalibrated BatchNorm statistics (importers/slimmable.py);
- channels dead in the weights need no source: the fold finds them in the graph;
- sensAI class-group models (`--sensai-grouping`, several files or a folder): combined into
  one module, equal structures fused (importers/sensai.py);
- Mayo TensorFlow checkpoints (`--mayo-model YAML`): the network rebuilt from Mayo's YAML,
  FBS gated convolutions as FBSConv2d, NetworkSlimmer masks as ChannelMask (importers/mayo.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import memory
from .errors import OptionError, UserError, first_line
from .gate_stats import load_sample_inputs
from .importers import gator, sensai, seed_layers, slimmable
from .importers.netslim import NetslimReport, netslim_specs
from .loading import build_model, load_checkpoint, load_weights
from .nn import MaskSpec, attach_masks
from .options import ModelOptions


@dataclass
class GatedModel:
    model: nn.Module
    example: torch.Tensor
    masks: list[MaskSpec] = field(default_factory=list)
    sources: dict = field(default_factory=dict)  # for the report: what supplied the masks


MAX_INPUT_ELEMENTS = 2**27  # 512 MiB of float32: the default bound of --max-input-elements


def parse_shape(text: str, max_elements: int = MAX_INPUT_ELEMENTS) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise OptionError(f"--input-shape {text!r} is not a comma-separated list of integers") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise OptionError(f"--input-shape {text!r} needs at least 2 positive dimensions (batch first)")
    check_input_elements(shape, max_elements)
    return shape


def check_input_elements(shape, max_elements: int = MAX_INPUT_ELEMENTS) -> None:
    """Refuse an input shape above the bound before anything is allocated: activations
    (what export, verification and run hold in memory) grow with it, and an absurd shape
    otherwise ends in minutes of swapping or the kernel's OOM killer, not an error."""
    elements = 1
    for d in shape:
        elements *= int(d)  # Python ints: no overflow
    if elements > max_elements:
        raise OptionError(f"input shape {'x'.join(map(str, shape))} has {elements:,} elements ({elements * 4 / 2**30:.1f} "
                          f"GiB of float32), above the limit of {max_elements:,}; raise --max-input-elements "
                          "if the machine has the memory")


def build_gated_model(opts: ModelOptions, module: nn.Module | None = None,
                      example: torch.Tensor | None = None, form_timer=None) -> GatedModel:
    """The gated PyTorch model and its static masks, from a checkpoint (`opts.checkpoint`,
    `opts.model`, ...) or from a model object the caller already has (`module`, as
    gate2deploy.compile receives it). `example` (else a normal sample of
    `opts.input_shape`) is the capture's example input. `form_timer`: how sensAI's forms are
    timed (importers/sensai.py time_forms, default: as captured; the export passes its target
    pipeline's)."""
    if example is None:
        if not opts.input_shape:
            raise OptionError("an input shape is needed: --input-shape N,C,H,W (or example inputs)")
        shape = parse_shape(opts.input_shape, opts.max_input_elements)
        # a sensAI grouping and a Mayo net need the example to build; everything else gets it
        # after the memory check
        example = torch.randn(shape) if opts.sensai_grouping or opts.mayo_model else None
    else:
        shape = tuple(example.shape)
    specs: list[MaskSpec] = []
    meta: dict = {}
    if module is not None:
        model, sources = module, {"checkpoint": None, "format": "module"}
    elif opts.sensai_grouping:
        model, sources = _load_sensai(opts, example, form_timer)
    elif opts.mayo_model:
        model, sources = _load_mayo(opts, example)
    else:
        model, specs, sources, meta = _load(opts)
    model.eval()
    _check_real(model)
    # before the first real forward (and before the example is allocated): export verifies a
    # dynamic batch at N + 1 as well (cli/export.py), so the estimate takes the larger. The
    # model as loaded: a slimmable one is estimated at full width (an upper bound).
    batch = shape[0] + (0 if getattr(opts, "static_batch", True) else 1)
    memory.check(model, (batch, *shape[1:]), opts.max_memory)
    if example is None:
        example = torch.randn(shape)
    if slimmable.is_slimmable(model) or _width_chosen(opts):
        if not slimmable.is_slimmable(model):
            raise OptionError(f"--width/--width-vector/--population/--recalibration-* need a slimmable model "
                              f"(Joslim's channel_space and set_real_ch); {type(model).__name__} is not one")
        model, sources["slimmable"] = slimmable.select_width(model, opts, meta, example, _all_samples(opts, example))
    sources.update(seed_layers.lower_seed_layers(model, example, opts.fbs_rate))
    check_runs(model, example)
    if opts.netslim_density is not None:
        slim_specs, report = netslim_specs(model, example, opts.netslim_density, opts.netslim_rule, opts.netslim_scope)
        specs += slim_specs
        sources["netslim"] = _netslim_summary(report)
    attach_masks(model, specs)
    return GatedModel(model, example, specs, sources)


def _all_samples(opts: ModelOptions, example: torch.Tensor):
    """Every sample of --sample-inputs (shape-checked against the example), or None."""
    path = getattr(opts, "sample_inputs", None)  # a field of the compile / info options
    if not path:
        return None
    return np.concatenate(load_sample_inputs(path, (1, *example.shape[1:])))


def _width_chosen(opts: ModelOptions) -> bool:
    return any(v is not None for v in (opts.width, opts.width_vector, opts.population, opts.recalibration_batches,
                                       opts.recalibration_batch_size))


def _load(opts: ModelOptions) -> tuple[nn.Module, list[MaskSpec], dict, dict]:
    paths = checkpoint_paths(opts)
    if len(paths) > 1:
        raise OptionError(f"{len(paths)} checkpoints given; several are read only as sensAI group models "
                          "(with --sensai-grouping)")
    ckpt = load_checkpoint(paths[0], trust_pickle=opts.trust_pickle, model_paths=opts.model_path)
    sources: dict = {"checkpoint": str(ckpt.path), "format": ckpt.meta.get("format", "state_dict")}
    specs: list[MaskSpec] = []
    if ckpt.module is not None:
        return ckpt.module, specs, sources, ckpt.meta
    if not opts.model:
        raise OptionError(f"{ckpt.path} holds only weights: pass --model package.module:callable "
                          "(or file.py:callable) to build the architecture")
    model = build_model(opts.model, opts.model_kwargs, opts.model_path)
    weights = ckpt.state_dict
    if gator.is_gator(weights):
        weights, gates = gator.split_checkpoint(weights)
        notes = load_weights(model, weights, str(ckpt.path))
        no_last_conv = gator.parse_no_last_conv(opts.gator_no_last_conv, opts.gator_config)
        gator_specs, summary = gator.mask_specs(model, gates, no_last_conv)
        specs += gator_specs
        sources["gator"] = {"arch": ckpt.meta.get("arch"), **summary}
    else:
        notes = load_weights(model, weights, str(ckpt.path))
    if notes:
        sources["weight_dtype_conversions"] = notes
    return model, specs, sources, ckpt.meta


def checkpoint_paths(opts: ModelOptions) -> list[str]:
    """`opts.checkpoint` as a list: the CLI's positional takes one or more paths."""
    paths = [opts.checkpoint] if isinstance(opts.checkpoint, (str, os.PathLike)) else list(opts.checkpoint or [])
    if not paths:
        raise OptionError("no checkpoint given")
    return [str(p) for p in paths]


def _load_sensai(opts: ModelOptions, example: torch.Tensor, timer=None) -> tuple[nn.Module, dict]:
    """sensAI group models (whole pickled modules) + grouping -> the combined module."""
    if opts.model:
        raise OptionError("--model is not used with --sensai-grouping: sensAI group models are whole "
                          "pickled modules (pass --trust-pickle)")

    def load(path) -> nn.Module:
        ckpt = load_checkpoint(path, trust_pickle=opts.trust_pickle, model_paths=opts.model_path)
        if ckpt.module is None:
            raise UserError(f"{path} holds only weights; sensAI group models are whole modules (torch.save(model))")
        return ckpt.module

    if opts.sensai_no_fuse and opts.sensai_form not in ("auto", "branches"):
        raise OptionError(f"--sensai-no-fuse contradicts --sensai-form {opts.sensai_form}")
    if opts.sensai_threads < 1:
        raise OptionError(f"--sensai-threads {opts.sensai_threads}: expected at least 1")
    form = "branches" if opts.sensai_no_fuse else opts.sensai_form
    grouped, files = sensai.from_files(checkpoint_paths(opts), opts.sensai_grouping, load, example,
                                       form=form, threads=opts.sensai_threads, timer=timer)
    plan = grouped.plan
    timed = ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in plan["candidates"].items() if "ms" in v)
    print(f"gate2deploy: sensAI form {plan['form']} ({plan['chosen_by']}{': ' + timed if timed else ''})",
          file=sys.stderr)
    if plan["form"] == "padded" and plan["not_padded_because"]:
        print(f"gate2deploy: sensAI groups not padded: {'; '.join(plan['not_padded_because'])}", file=sys.stderr)
    elif plan["branches"] and len(plan["head_rows"]) > 1 and plan["not_fused_because"] and form != "branches":
        print(f"gate2deploy: sensAI groups {plan['branches']} run as parallel branches: "
              f"{'; '.join(plan['not_fused_because'])}", file=sys.stderr)
    return grouped, {"checkpoint": [str(f) for f in files], "format": "sensAI group models",
                     "sensai": {"grouping": str(opts.sensai_grouping), **plan}}


def _load_mayo(opts: ModelOptions, example: torch.Tensor) -> tuple[nn.Module, dict]:
    from .importers import mayo

    if opts.model:
        raise OptionError("--model is not used with --mayo-model: the architecture comes from Mayo's YAML")
    paths = checkpoint_paths(opts)
    if len(paths) > 1:
        raise OptionError(f"{len(paths)} checkpoints given; a Mayo model reads one TensorFlow checkpoint")
    built = mayo.build(paths[0], opts.mayo_model, opts.mayo_set, opts.mayo_root, example,
                       dataset=opts.mayo_dataset, update_slimmers=opts.mayo_overriders_update)
    return built.model, {"checkpoint": built.summary["checkpoint"], "format": "Mayo TensorFlow checkpoint",
                         "mayo": built.summary}


def _check_real(model: nn.Module) -> None:
    """A complex parameter or buffer (a pickled module's, a builder's) is refused by name: the
    exporters cast it to real, dropping the imaginary part."""
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor) and tensor.is_complex():
            raise UserError(f"the model's {name} is complex ({tensor.dtype}); gate2deploy compiles real-valued models")


def check_runs(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - any failure here is the shape not fitting
        first = first_line(exc)
        raise UserError(f"--input-shape {','.join(map(str, example.shape))} does not fit the model: {first}") from None


def _netslim_summary(r: NetslimReport) -> dict:
    total = sum(r.kept.values())
    return {"rule": r.rule, "scope": r.scope, "density": r.density,
            "participating_layers": len(r.participating), "kept_channels": total,
            "excluded": r.excluded, "emptied_layers": r.emptied}

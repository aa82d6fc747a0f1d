"""Options of each command as typed dataclasses, shared by the Python API and the CLI.

The CLI's argparse builds them (`from_namespace`); nothing below the CLI sees an argparse
Namespace. Python callers pass the same names as keyword arguments to gate2deploy.compile /
info (`from_kwargs`, which refuses unknown names with the list of known ones).
Field names are the flags' names with dashes as underscores (`--netslim-density` ->
`netslim_density`), so a flag and its option are found by the same word.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .errors import OptionError


PHYSICAL_WIDTHS = ("fast", "exact", "measured")  # --physical-widths / physical_widths=
STREAM_CONVS = ("auto", "on", "off")  # --stream-convs / stream_convs= (auto: kernel_choice.choose_stream_convs)


@dataclass
class ModelOptions:
    """How to get the gated PyTorch model: checkpoint, architecture, mask sources."""

    checkpoint: str | list[str] | None = None  # a path (.pt2, state_dict, trusted pickle); several: sensAI
    model: str | None = None  # package.module:callable or file.py:callable
    model_kwargs: str | None = None  # JSON keyword arguments for the model callable
    model_path: list[str] = field(default_factory=list)  # folders to import model code from
    input_shape: str | None = None  # "1,3,224,224"
    max_input_elements: int = 2**27  # refuse larger inputs before allocating (frontend.check_input_elements)
    max_memory: float | None = None  # GiB; refuse an export estimated above it (memory.py; None: available memory)
    trust_pickle: bool = False
    netslim_density: float | None = None
    netslim_rule: str = "mayo"
    netslim_scope: str = "global"
    gator_no_last_conv: str | None = None  # "true" | "false" | None (the gate count decides)
    gator_config: str | None = None
    fbs_rate: float | None = None  # PyTorch-FBS blocks' rate (importers/seed_layers.py)
    # slimmable networks (importers/slimmable.py): at most one of width / width_vector / population
    width: float | None = None  # uniform width multiplier in (0, 1]
    width_vector: str | None = None  # JSON file: one multiplier per search dimension
    population: int | str | None = None  # index into the checkpoint's population_data
    recalibration_batches: int | None = None  # BN recalibration passes over --sample-inputs (None: all)
    recalibration_batch_size: int | None = None  # None: min(32, number of samples)
    sensai_grouping: str | None = None  # grouping_config.npy / .json: checkpoint = sensAI group models
    sensai_no_fuse: bool = False  # every sensAI group its own branch (no horizontal fusion): --sensai-form branches
    sensai_form: str = "auto"  # importers/sensai.py FORMS: auto = the fastest form, timed on ONNX Runtime CPU
    sensai_threads: int = 2  # ONNX Runtime threads the auto form is timed with
    # Mayo (importers/mayo.py): the checkpoint is a TensorFlow checkpoint prefix or folder
    mayo_model: list[str] = field(default_factory=list)  # Mayo YAMLs, merged in order
    mayo_set: list[str] = field(default_factory=list)  # Mayo `key.path=value` overrides
    mayo_root: str | None = None  # default: the nearest folder above the YAML holding models/
    mayo_dataset: str | None = None  # a Mayo dataset YAML (num_classes), merged first
    mayo_overriders_update: bool = False  # recompute NetworkSlimmer masks as `overriders-update` does


@dataclass
class CompileOptions(ModelOptions):
    """`export` / gate2deploy.compile: the model options plus what the compiler does."""

    target: str = "ort"
    verify: bool = True
    rtol: float = 1e-4
    allow_nonfinite: bool = False  # verify even if the PyTorch model's outputs are NaN/Inf
    keep_unfoldable: bool = False
    physical_widths: str = "fast"  # "fast" | "exact" | "measured"
    gated_kernels: str = "native"  # "native" | "measured" (gate2deploy/kernel_choice.py; --target ort)
    kernel_threads: int = 2  # intra-op threads the measured choices time with (the deployment's)
    # --target ort: convs whose weights dwarf their output as StreamConv (passes/stream_weight_convs.py):
    # "auto" kept where the network measures faster (kernel_choice.choose_stream_convs), "on", "off"
    stream_convs: str = "auto"
    sample_inputs: str | None = None
    pg_static_scale: bool = False
    debug_passes: str | None = None  # folder: dump and re-check the graph after each pass
    static_batch: bool = False  # pin the batch (default: a dynamic batch axis, passes/dynamic_batch.py)
    batch: str | None = None  # trt: the engine profile's "min,opt,max" batch sizes
    fp16: bool = False  # trt: build the engine in FP16


@dataclass
class InfoOptions(ModelOptions):
    physical_widths: str = "fast"
    sample_inputs: str | None = None


def from_namespace(cls, args) -> object:
    """The dataclass `cls` filled from an argparse Namespace (fields it lacks keep defaults);
    `--no-verify` maps to verify=False."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if "verify" in {f.name for f in fields(cls)} and getattr(args, "no_verify", False):
        values["verify"] = False
    return cls(**values)


def from_kwargs(cls, **kwargs) -> object:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}; options are: {', '.join(sorted(known))}")
    return cls(**kwargs)


def replace(options, **changes):
    return dataclasses.replace(options, **changes)

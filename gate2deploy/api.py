"""The Python front door: gate2deploy.compile / info / profile. The CLI is a thin layer over
these (gate2deploy/cli), so a notebook and a shell get the same compiler.

    import torch, torchvision, gate2deploy
    net = torchvision.models.resnet18()            # with gate2deploy.nn masks, or seed layers
    compiled = gate2deploy.compile(net, torch.randn(1, 3, 224, 224), target="ort")
    compiled.report["macs_after"], compiled.run(x), compiled.save("r18.onnx")

    # or from a checkpoint, with the CLI's options by name:
    compiled = gate2deploy.compile("gator_r18.pth", input_shape="1,3,224,224",
                                   model="torchvision.models:resnet18", target="onnx")

Options are the fields of gate2deploy.options.CompileOptions (the flags' names with
underscores). Errors are gate2deploy.errors.UserError subclasses (the CLI's exit codes).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import gate_stats
from . import report as rep
from .capture import capture
from .errors import OptionError, VerificationError, first_line
from .frontend import GatedModel, check_runs, build_gated_model
from .options import PHYSICAL_WIDTHS, STREAM_CONVS, CompileOptions, InfoOptions, from_kwargs
from .pipeline import FOLD_ONLY, PassContext, run_pipeline, with_static_shapes
from .targets import Target, get_target
from .passes.dynamic_batch import pin_batch
from .verify import check_export, random_inputs


@dataclass
class CompiledModel:
    """A compiled, verified model: `onnx_model` for `target`, and the export report; the
    PyTorch model it was verified against and the inputs used (for the TensorRT engine's own
    check where one is built)."""

    onnx_model: onnx.ModelProto
    target: Target
    report: dict
    torch_model: nn.Module | None = None
    input_shape: tuple = ()
    samples: list | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (atomically) as the target writes it."""
        return self.target.write(self.onnx_model, path)

    def session(self, threads: int = 2):
        """An ONNX Runtime session of the compiled model (custom ops registered)."""
        return self.target.session(self.onnx_model, threads)

    def run(self, inputs, threads: int = 2) -> list[np.ndarray]:
        """Run once: `inputs` a tensor/array for the single input, or {name: array}."""
        sess = self.session(threads)
        if not isinstance(inputs, dict):
            inputs = {sess.get_inputs()[0].name: inputs}
        feeds = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                 for k, v in inputs.items()}
        return sess.run(None, feeds)


def _example(example_inputs) -> torch.Tensor | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(isinstance(d, int) for d in example_inputs):
        return torch.randn(tuple(example_inputs))  # a shape
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) != 1:
            raise OptionError(f"models with one input are supported; got {len(example_inputs)} example inputs")
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor):
        raise OptionError(f"example inputs must be a tensor or a shape, not {type(example_inputs).__name__}")
    return example_inputs.detach().float()


def _gated(model_or_checkpoint, example_inputs, opts, form_timer=None) -> GatedModel:
    example = _example(example_inputs)
    if isinstance(model_or_checkpoint, nn.Module):
        return build_gated_model(opts, module=model_or_checkpoint, example=example)
    if model_or_checkpoint is not None:
        opts.checkpoint = ([str(p) for p in model_or_checkpoint] if isinstance(model_or_checkpoint, (list, tuple))
                           else str(model_or_checkpoint))  # several: sensAI group models
    return build_gated_model(opts, example=example, form_timer=form_timer)


def _pass_context(opts: CompileOptions, stream: bool, choose_widths: bool, **more) -> PassContext:
    """The export's PassContext: its --keep-unfoldable policy and StreamConv switch, the
    physical-width switch as the caller runs the pipeline, and `more` (debug folder, batch axis)."""
    return PassContext(unfoldable_policy="keep" if opts.keep_unfoldable else "error",
                       choose_widths=choose_widths, stream_convs=stream, **more)


def _sensai_form_timer(tgt: Target, opts: CompileOptions, stream: bool):
    """`--sensai-form auto` times each candidate form (and each hybrid layer) as this export
    makes it: captured, then through the target's pipeline (folds, custom ops, StreamConv where
    the pass puts it; `--stream-convs auto` measures its own choice afterwards, on the chosen
    form; `--physical-widths measured` is timed as `fast`), on ONNX Runtime CPU. Why: the
    forms' times differ between the plain graph and the target's (sensAI VGG-19-BN, batch 8,
    Intel Xeon, 2026-12-07: padded 79.7 / fused 97.0 ms as captured, 53.6 / 54.2 ms through
    the ort pipeline, 66.9 / 63.6 ms in tools/bench_sensai.py without spinning). TensorRT's
    engines are not timed here: its forms are timed as captured (None: importers/sensai.py's
    default)."""
    if tgt.name == "trt":
        return None
    from .importers.sensai import time_forms

    def prepare(captured: onnx.ModelProto) -> onnx.ModelProto:
        ctx = _pass_context(opts, stream, choose_widths=opts.physical_widths != "exact")
        return tgt.prepare(run_pipeline(captured, tgt.pipeline, ctx))

    timer = functools.partial(time_forms, prepare=prepare)
    timer.label = f"the --target {tgt.name} pipeline on ONNX Runtime CPU"
    return timer


def compile(model_or_checkpoint, example_inputs=None, target: str = "ort", **options) -> CompiledModel:  # noqa: A001
    """Compile a gated / pruned model for `target` ("onnx", "ort", "trt"), verified against
    the PyTorch model. `model_or_checkpoint`: an nn.Module or a checkpoint path;
    `example_inputs`: a tensor (or a shape), else `input_shape=` in options."""
    return compile_with(model_or_checkpoint, example_inputs, from_kwargs(CompileOptions, target=target, **options))


def compile_with(model_or_checkpoint, example_inputs, opts: CompileOptions) -> CompiledModel:
    # Every option is checked before any work (loading, tracing), from the CLI and from Python alike.
    tgt = get_target(opts.target)
    _check_physical_widths(opts.physical_widths)
    if tgt.name != "trt" and (opts.batch or opts.fp16):
        raise OptionError("--batch and --fp16 are TensorRT build options: only with --target trt")
    if opts.pg_static_scale and not opts.sample_inputs:
        raise OptionError("--pg-static-scale needs --sample-inputs to calibrate on")
    if opts.gated_kernels not in ("native", "measured"):
        raise OptionError(f"--gated-kernels must be native or measured, not {opts.gated_kernels!r}")
    if opts.gated_kernels == "measured" and tgt.name != "ort":
        raise OptionError("--gated-kernels measured times the native kernels: only with --target ort")
    if opts.stream_convs not in STREAM_CONVS:
        raise OptionError(f"--stream-convs must be one of {', '.join(STREAM_CONVS)}, not {opts.stream_convs!r}")
    if opts.stream_convs == "on" and tgt.name != "ort":  # auto / off: nothing to do on other targets
        raise OptionError("--stream-convs on needs --target ort (StreamConv is an op of the native library)")
    if opts.kernel_threads < 1:
        raise OptionError(f"--kernel-threads must be at least 1, not {opts.kernel_threads}")
    if opts.debug_passes:
        _check_debug_folder(opts.debug_passes)
    stream = tgt.name == "ort" and opts.stream_convs != "off"
    gated = _gated(model_or_checkpoint, example_inputs, opts, _sensai_form_timer(tgt, opts, stream))
    samples = load_samples(opts.sample_inputs, gated)
    if opts.pg_static_scale:
        gate_stats.calibrate_pg_scales(gated.model, [torch.from_numpy(b) for b in samples])
    batch_note = None if opts.static_batch else _other_batch_problem(gated.model, gated.example)
    start = time.perf_counter()
    captured = capture(gated.model, gated.example)
    kernel_report: dict = {}
    twins: list[onnx.ModelProto | None] = [None]  # the pipeline's model before the kernel choice

    def run_passes(batch_axis: bool) -> tuple[onnx.ModelProto, PassContext]:
        def make_ctx():  # `measured` widths: _fold's width chooser
            return _pass_context(opts, stream, choose_widths=opts.physical_widths == "fast",
                                 debug_dir=opts.debug_passes, batch_axis=batch_axis)
        compiled, ctx = _fold(captured, tgt.pipeline, tgt.name, opts.physical_widths, make_ctx,
                              tuple(gated.example.shape))
        twins[0] = None
        kernel_report["stream_convs"] = {"asked": opts.stream_convs, "convs": ctx.streamed_convs,
                                         "kept": bool(ctx.streamed_convs)}
        if opts.stream_convs == "auto" and ctx.streamed_convs:
            from .kernel_choice import choose_stream_convs

            compiled, measured = choose_stream_convs(compiled, gated.example.numpy(), threads=opts.kernel_threads)
            kernel_report["stream_convs"].update(measured)
        if opts.gated_kernels == "measured":
            from .kernel_choice import choose_gated_kernels

            twins[0] = compiled  # its custom nodes give the verification their fused epilogues
            compiled, kernel_report["kernel_choice"] = choose_gated_kernels(
                compiled, gated.example.numpy(), threads=opts.kernel_threads)
        return tgt.prepare(compiled), ctx  # verified below as written

    compiled, ctx = run_passes(not opts.static_batch and batch_note is None)
    compile_seconds = time.perf_counter() - start
    shape = tuple(gated.example.shape)
    batch_note = batch_note or ctx.batch_note
    dynamic = not opts.static_batch and batch_note is None

    check = second = None
    if opts.verify:
        check = check_export(gated.model, captured, compiled, shape, opts.rtol, samples,
                             allow_nonfinite=opts.allow_nonfinite, twins=twins[0])
        if check.passed and dynamic:  # the relaxed batch axis, at another size
            other = (shape[0] + 1, *shape[1:])
            try:
                second = check_export(gated.model, captured, compiled, other, opts.rtol, random_inputs(other, 1),
                                      allow_nonfinite=opts.allow_nonfinite, twins=twins[0])
            except Exception as exc:  # noqa: BLE001 - the relaxed graph does not run at N + 1
                # (a constant with the batch baked in that the batch pass did not recognise,
                # e.g. a ScatterElements' indices): keep the static batch, verified at N above
                first = first_line(exc)
                batch_note = f"the relaxed graph does not run at batch {other[0]}: {first}"
                dynamic = False
                compiled, ctx = run_passes(False)
                check = check_export(gated.model, captured, compiled, shape, opts.rtol, samples,
                                     allow_nonfinite=opts.allow_nonfinite, twins=twins[0])
        for c in (check, second):
            if c is not None and not c.passed:
                raise VerificationError(f"verification failed: {c.summary()}; nothing written")
    before = rep.model_cost(with_static_shapes(captured))
    after = rep.model_cost(pin_batch(compiled, shape[0]) if dynamic else compiled)
    report = {
        "target": tgt.name,
        "macs_before": before.macs, "macs_after": after.macs,
        "params_before": before.params, "params_after": after.params,
        "max_abs_err": check.output.max_abs_err if check else None,
        "max_rel_err": check.output.max_rel_err if check else None,
        "tolerance": opts.rtol if check else None,
        "verification": check.summary() if check else "skipped (--no-verify)",
        "gated_layer_check": check.gated if check else None,
        "compile_seconds": round(compile_seconds, 3),
        "pass_seconds": ctx.timings,
        "mask_sources": gated.sources,
        # gated layers exported as a generic graph (warned on stderr by the front end)
        "unlowered_gated_layers": gated.sources.get("seed_layers", {}).get("unlowered", []),
        "fold": {
            "removed_channels": ctx.fold.removed_channels,
            "constant_folds": ctx.fold.constant_folds,
            "removed_layers": ctx.fold.removed_layers,
            "unfoldable": [vars(u) for u in ctx.fold.unfoldable],
            "pinned_ops": [vars(o) for o in ctx.fold.pinned_ops],
        },
        "physical_widths": ctx.widths,
        "sparse_input_convs": ctx.sparse_input_convs,
        "fused_epilogues": ctx.fused_epilogues,
        "fused_quantizers": ctx.fused_quantizers,
        "layers": rep.compare(before, after),
        "batch": {"axis": "dynamic" if dynamic else "static", "captured": shape[0],
                  "verified": [] if check is None else [shape[0]] + ([shape[0] + 1] if second else []),
                  **({"note": batch_note} if batch_note else {})},
        **gated_layer_report(gated, captured, samples),
        **kernel_report,
    }
    return CompiledModel(compiled, tgt, report, gated.model, shape, samples)


def _check_debug_folder(folder: str) -> None:
    """--debug-passes DIR: a folder that exists or can be made, and is writable."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OptionError(f"--debug-passes {folder} is a file; give a folder for the graphs")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OptionError(f"--debug-passes {folder}: {existing} is not a writable folder")


def _check_physical_widths(value: str) -> None:
    """Before any work: the Python API has no argparse to refuse a bad value."""
    if value not in PHYSICAL_WIDTHS:
        raise OptionError(f"physical_widths must be one of {', '.join(PHYSICAL_WIDTHS)}, not {value!r}")


def _fold(captured: onnx.ModelProto, pipeline: str, target: str, physical_widths: str, make_ctx,
          input_shape) -> tuple[onnx.ModelProto, PassContext]:
    """The pipeline with the asked physical widths; ctx.widths says what was used (and, for
    `measured`, what was timed: gate2deploy/measure_widths.py)."""
    if physical_widths != "measured":
        ctx = make_ctx()
        compiled = run_pipeline(captured, pipeline, ctx)
        ctx.widths = {"asked": physical_widths, "used": physical_widths}
        return compiled, ctx
    from .measure_widths import fold_measured
    compiled, ctx, widths = fold_measured(captured, pipeline, make_ctx, target, input_shape)
    ctx.widths = widths.as_dict()
    return compiled, ctx


def _other_batch_problem(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why the PyTorch model cannot be verified at batch N + 1 (e.g. a torch.export program
    traced at batch N guards it), or None. The export then keeps the static batch: a batch
    axis PyTorch cannot be compared on is not verified."""
    other = torch.randn((example.shape[0] + 1, *example.shape[1:]))
    try:
        with torch.no_grad():
            model(other)
    except Exception as exc:  # noqa: BLE001 - any failure means "not at another batch"
        first = first_line(exc)
        return f"the PyTorch model does not run at batch {other.shape[0]}: {first}"
    return None


def info(model_or_checkpoint=None, example_inputs=None, **options) -> dict:
    """Per-layer MACs and parameters, dense (as trained) vs effective (what the fold leaves),
    and gate statistics with `sample_inputs`; what `gate2deploy info` prints and writes."""
    return info_with(model_or_checkpoint, example_inputs, from_kwargs(InfoOptions, **options))


def info_with(model_or_checkpoint, example_inputs, opts: InfoOptions) -> dict:
    """info() with its options already built (the CLI's path)."""
    _check_physical_widths(opts.physical_widths)
    gated = _gated(model_or_checkpoint, example_inputs, opts)
    captured = capture(gated.model, gated.example)
    effective, ctx = _fold(captured, FOLD_ONLY, "onnx", opts.physical_widths,
                           lambda: PassContext(unfoldable_policy="keep", choose_widths=opts.physical_widths == "fast"),
                           tuple(gated.example.shape))
    dense, eff = rep.model_cost(with_static_shapes(captured)), rep.model_cost(effective)
    layers = []
    for row in rep.compare(dense, eff):
        d = dense.layers[row["layer"]]
        e = eff.layers.get(row["layer"])
        layers.append({**row, "params_before": d.params, "params_after": e.params if e else 0})
    return {
        "input_shape": list(gated.example.shape),
        "mask_sources": gated.sources,
        "dense": {"macs": dense.macs, "params": dense.params},
        "effective": {"macs": eff.macs, "params": eff.params},
        "unfoldable": [vars(u) for u in ctx.fold.unfoldable],
        "pinned_ops": [vars(o) for o in ctx.fold.pinned_ops],
        "physical_widths": ctx.widths,
        "layers": layers,
        **gated_layer_report(gated, captured, load_samples(opts.sample_inputs, gated)),
    }


def profile(model_or_checkpoint=None, input_shape: str | None = None, out: str | os.PathLike | None = None,
            model: str | None = None, model_kwargs: str | None = None, trust_pickle: bool = False,
            gator_no_last_conv: str | None = None, gator_config: str | None = None,
            mayo_model=(), mayo_set=(), mayo_root: str | None = None, mayo_dataset: str | None = None,
            mayo_overriders_update: bool = False, **options):
    """Per-layer latency on the target, written to `out` as a LUT, Gator's config and a report
    (what `gate2deploy profile` does). `options`: the fields of profiling.runner.ProfileOptions
    (target, threads, settings, fractions, edges, ray, device_classes, ...). Returns the
    ProfileResult; with ray=ADDRESS a {device class: ProfileResult}. Several Gator checkpoints
    of one architecture (a list): one LUT, and each checkpoint's predicted latency in
    checkpoints.csv / checkpoints.png beside it. `mayo_*`: a Mayo TensorFlow checkpoint with
    its YAML, as for compile (importers/mayo.py)."""
    from .frontend import parse_shape
    from .profiling.runner import ProfileOptions, profile as run_profile

    if out is None:
        raise OptionError("-o/--out is required (the folder to write the profile into)")
    if not input_shape:
        raise OptionError("--input-shape is required, e.g. 1,3,224,224")
    if model_or_checkpoint is None and not model:
        raise OptionError("give a checkpoint and/or --model to say what to profile")
    several = isinstance(model_or_checkpoint, (list, tuple)) and len(model_or_checkpoint) > 1
    if isinstance(model_or_checkpoint, (list, tuple)) and not several:
        model_or_checkpoint = model_or_checkpoint[0] if model_or_checkpoint else None
    checkpoints = list(model_or_checkpoint) if several else [model_or_checkpoint]
    example = torch.randn(parse_shape(input_shape))
    if mayo_model:
        if model:
            raise OptionError("--model is not used with --mayo-model: the architecture comes from Mayo's YAML")
        if several:
            raise OptionError("--mayo-model takes one checkpoint (several are compared by their Gator gates)")
        from .importers import mayo

        net = mayo.without_slim_masks(mayo.build(str(model_or_checkpoint), list(mayo_model), list(mayo_set),
                                                 mayo_root, example, dataset=mayo_dataset,
                                                 update_slimmers=mayo_overriders_update).model)
        current, no_last_conv = None, False
    else:
        loaded = [_profile_model(c, model, model_kwargs, trust_pickle, gator_no_last_conv, gator_config)
                  for c in checkpoints]
        net, current, no_last_conv = loaded[0]
    if several:  # one architecture, one LUT; each checkpoint's own gates predicted from it
        for c, (_, kept, _) in zip(checkpoints, loaded):
            if kept is None:
                raise OptionError(f"{c}: several checkpoints are compared by their Gator gates, and this one has "
                                  "none (profile it on its own)")
    check_runs(net, example)
    unknown = set(options) - set(ProfileOptions.__dataclass_fields__)
    if unknown:
        raise OptionError(f"unknown profile option {sorted(unknown)[0]!r}")
    popts = ProfileOptions(**{**options, "target": get_target(options.get("target", "ort")).name,
                              "gator_no_last_conv": no_last_conv})
    spec = model or str(model_or_checkpoint)
    info = {"spec": spec, "checkpoint": [str(c) for c in checkpoints] if several else
            None if isinstance(model_or_checkpoint, nn.Module) else model_or_checkpoint,
            "input_shape": list(example.shape)}
    result = run_profile(net, example, out, popts, info, current)
    if several:
        from .profiling.runner import compare_checkpoints

        kept = {str(c): channels for c, (_, channels, _) in zip(checkpoints, loaded)}
        for one in result.values() if isinstance(result, dict) else [result]:
            compare_checkpoints(one, kept)
    return result


def _profile_model(model_or_checkpoint, model, model_kwargs, trust_pickle, gator_no_last_conv, gator_config):
    """The unpruned model, the checkpoint's Gator channel counts (or None), and Gator's
    no_last_conv (as stated, else as the checkpoint's gate count says, else False)."""
    from .importers import gator
    from .loading import build_model, load_checkpoint, load_weights

    stated = gator.parse_no_last_conv(gator_no_last_conv, gator_config)
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint.eval(), None, bool(stated)
    if model_or_checkpoint is None:
        return build_model(model, model_kwargs).eval(), None, bool(stated)
    ckpt = load_checkpoint(model_or_checkpoint, trust_pickle=trust_pickle)
    if ckpt.module is not None:
        return ckpt.module.eval(), None, bool(stated)
    if not model:
        raise OptionError(f"{ckpt.path} holds only weights: pass --model package.module:callable to build "
                          "the architecture")
    net = build_model(model, model_kwargs)
    weights, current = ckpt.state_dict, None
    if gator.is_gator(weights):
        weights, gates = gator.split_checkpoint(weights)
        load_weights(net, weights, str(ckpt.path))
        _, summary = gator.mask_specs(net, gates, stated)  # checks gate count and sizes against the model
        stated = summary["no_last_conv"]
        current = [max(1, c) for c in summary["kept_channels"]]
    else:
        load_weights(net, weights, str(ckpt.path))
    return net.eval(), current, bool(stated)


def load_samples(path: str | None, gated: GatedModel):
    if not path:
        return None
    return gate_stats.load_sample_inputs(path, tuple(gated.example.shape))


def gated_layer_report(gated: GatedModel, captured: onnx.ModelProto, samples) -> dict:
    """Report fields for dynamic gates: each gated node and its PG scale mode; with sample
    inputs, each layer's gate-on fraction and the MACs it implies."""
    nodes = gate_stats.describe_gated_nodes(captured)
    if not nodes:
        return {}
    out = {"gated_layers": nodes, "pg_scales": gate_stats.pg_scale_modes(gated.model)}
    if samples:
        out["gate_statistics"] = gate_stats.gate_report(gated.model, [torch.from_numpy(b) for b in samples])
    return out

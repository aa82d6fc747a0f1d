"""Mayo (seed 000, deep-fry/mayo, TensorFlow 1 + tf.contrib.slim) checkpoints -> PyTorch.

    gate2deploy export checkpoints/resnet18/cifar10/checkpoint-42 \\
        --mayo-model models/gate/resnet18.yaml --input-shape 1,3,32,32 -o r18.onnx

The YAML net description (mayo_config.py resolves `_import`, `$()`, `^()`) is turned into a
PyTorch module layer by layer, with the checkpoint's variables loaded by the names Mayo's
graph builder gives them; then the usual passes fold netslim masks and lower FBS gates.

Reading checkpoints: TensorFlow (`pip install gate2deploy[mayo]`, tensorflow-cpu). Decision:
its reader is the format's reference (tensor bundle: an SSTable index of BundleEntryProto plus
sharded data files), it installs beside the pinned numpy / protobuf / onnx without conflict
(`pip check` clean, about 25 s from a warm cache), and the tests need TensorFlow anyway to
write Mayo-layout checkpoints. The price is size (about 1.3 GB installed) and a ~5 s import,
paid only by Mayo users: TensorFlow is imported only when `--mayo-model` is given.

Names, shapes and semantics (facts read from Mayo's code; citations per item):
- Variable scopes: `<model.name>/<module>/.../<layer>/` (mayo/net/tf/transform.py
  `_add_var_scope`: the module path; `_config_layer`: scope = the layer name).
- `convolution` = slim.conv2d: `weights` [kh, kw, Cin, Cout] (HWIO -> OIHW here), `biases`
  only without a normalizer; `BatchNorm/{beta, gamma, moving_mean, moving_variance}` with
  slim.batch_norm's defaults (center true, scale false, epsilon 0.001) overridden by
  `normalizer_params`; activation relu unless `activation_fn` says otherwise (null: none).
  `depthwise_convolution` = slim.separable_conv2d without pointwise: `depthwise_weights`
  [kh, kw, C, m] -> [C*m, 1, kh, kw], groups C. `fully_connected`: `weights` [in, out].
- Padding (mayo/net/tf/base.py `instantiate_numeric_padding`): a number or [h, w] pairs pads
  with zeros BEFORE the layer (then VALID) - for max pooling too, zeros not -inf; `same` is
  TensorFlow's SAME (out = ceil(in / stride), the odd pixel at the bottom/right), `valid` none.
- Pools (mayo/net/tf/layers.py): slim's stride default 2, padding VALID; the kernel is
  clipped to the input (`_reduce_kernel_size_for_small_input`), 1x1 at stride 1 is a no-op.
  SAME average pooling divides by the valid pixels (TensorFlow), not the padded window.
- `flatten` is NHWC-ordered (slim.flatten), `squeeze` / `concat` axes are NHWC axes: mapped.
- `gated_convolution` (mayo/net/tf/gate/base.py, parametric.py; FBS_CONTRACT.md): policy
  `parametric` only (naive / squeeze are refused by name), granularity `channel`. Variables:
  `weights` (no biases), `BatchNorm/moving_mean|moving_variance` (scale and center off),
  `gate/weights` [1, 1, Cin, Cout] + `gate/biases` (`gate/factor/*` with `factor` > 0),
  `gate/shift` (beta, when normalizer_params.center is not false), `gate/threshold` for
  threshold `local` (`<layer>/gate/threshold`) or `global` (`<module>/gate/threshold` of the
  first gated layer). Numeric padding is applied before the gated conv, so the saliency
  pools the zero-padded input (FBSConv2d `pool_pads`). A TensorFlow SAME padding that is
  asymmetric is padded before the FBS module and the avg/l1/l2 saliency's 1/(padded area) is
  rescaled to 1/(input area) in the gate's first weights (max pool: refused there).
- Overriders (mayo/net/tf/transform.py `_config_layer`, mayo/override/prune/netslim.py):
  `activation: {<name>: {type: mayo.override.NetworkSlimmer}}` multiplies the layer's
  normalised output by `activations/NetworkSlimmer.mask` (bool [C]) before the activation,
  when `activations/NetworkSlimmer.enable` is true. The stored mask is what Mayo's forward
  applies; `--mayo-overriders-update` instead recomputes it as Mayo's `overriders-update`
  does (NetworkSlimmer._threshold / _global_threshold / _updated_mask: k = ceil(n * density)
  over the raw BatchNorm gammas of every slimmer with should_update, global by default,
  threshold the (k+1)-th largest (0 when k = n), keep gamma > threshold; the global threshold
  is the first updating slimmer's, by its density, reused by all later ones). Gradient overriders act only in
  training: ignored. Quantizers are refused by name; so is anything else.
  A NetworkSlimmer on a gated convolution cannot run in Mayo (its parametric BatchNorm has no
  gamma for NetworkSlimmer.gamma, and the gate reuses the activation): refused.
- Checkpoint / YAML mismatch: a variable the YAML needs and the checkpoint lacks, of another
  shape, or a checkpoint variable under `<model.name>/` that the model does not use (other
  than optimizer slots `<variable>/<slot>`) is an error naming it. Variables outside the
  model's scope (`imgs_seen`, `mayo/config`, learning-rate state) are not the model's.
- `$(dataset.task.num_classes)` without a dataset YAML (`--mayo-dataset`): the classifier's
  width is read from the checkpoint's variable shape.
The exported model takes NCHW input as Mayo's network sees it (after the dataset's
preprocessing, which is not part of the network).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, first_line
from ..gated import FBSConv2d
from ..nn import ChannelMask
from . import mayo_config as mc

INSTALL_HINT = "pip install gate2deploy[mayo]"
QUANTIZERS = ("FixedPointQuantizer", "CourbariauxQuantizer", "DGQuantizer", "DGTrainableQuantizer",
              "FloatingPointQuantizer", "ShiftQuantizer", "LogQuantizer", "Recentralizer",
              "IncrementalQuantizer", "MixedQuantizer", "TernaryQuantizer", "ChannelTernaryQuantizer")
BATCH_NORM = ("tensorflow.contrib.slim.batch_norm", "tensorflow.contrib.layers.batch_norm", "slim.batch_norm")
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
# NHWC axis -> NCHW axis for 4-D tensors
NHWC_TO_NCHW = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2, -4: 0}


@dataclass
class Step:
    path: tuple  # module path, model name first
    name: str
    params: dict
    inputs: list  # tensor keys (resolved)
    output: str

    @property
    def scope(self) -> str:
        return "/".join((*self.path, self.name))


@dataclass
class MayoBuild:
    model: nn.Module
    summary: dict
    layers: list = field(default_factory=list)  # (step, module name, in shapes, out shape) for `info`


# ---- checkpoint -------------------------------------------------------------------------

def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Triton's native library must be loaded before TensorFlow's: loaded after it (torch
    # imports triton lazily, e.g. for the fake-tensor trace of the memory check), it crashes
    # the process with SIGSEGV (tensorflow-cpu 2.21 + triton 3.8; their bundled LLVMs clash).
    # Loaded first, both work (tests/test_mayo.py runs the CLI in a fresh process to check).
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    try:
        import tensorflow as tf
    except ImportError:
        raise UserError(f"reading Mayo (TensorFlow) checkpoints needs TensorFlow: {INSTALL_HINT}") from None
    return tf


def checkpoint_prefix(path: str) -> str:
    """A checkpoint prefix (`.../checkpoint-42`, whose `.index` exists) or a folder (the
    prefix its `checkpoint` manifest names as the latest)."""
    p = Path(path)
    if p.is_dir():
        tf = _tensorflow()
        latest = tf.train.latest_checkpoint(str(p))
        if latest is None:
            raise UserError(f"{path} is a folder without a TensorFlow checkpoint manifest (`checkpoint` file)")
        return latest
    for suffix in (".index", ".meta"):
        if p.name.endswith(suffix):
            p = p.with_name(p.name[: -len(suffix)])
    if re.search(r"\.data-\d+-of-\d+$", p.name):
        p = p.with_name(re.sub(r"\.data-\d+-of-\d+$", "", p.name))
    if not Path(str(p) + ".index").is_file():
        raise UserError(f"{path} is not a TensorFlow checkpoint (no {p}.index)")
    return str(p)


class Variables:
    """The checkpoint's variables, read on demand; remembers which ones were used."""

    def __init__(self, prefix: str):
        tf = _tensorflow()
        try:
            self.reader = tf.train.load_checkpoint(prefix)
            self.shapes = {k: tuple(v) for k, v in self.reader.get_variable_to_shape_map().items()}
        except Exception as exc:  # noqa: BLE001 - TensorFlow's errors for damaged bundles vary
            first = first_line(exc)
            raise UserError(f"{prefix} is not a readable TensorFlow checkpoint: {first}") from None
        self.prefix = prefix
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str, layer: str) -> tuple:
        if name not in self.shapes:
            raise UserError(f"checkpoint {self.prefix} lacks variable {name} that layer {layer} of the YAML needs")
        return self.shapes[name]

    def get(self, name: str, layer: str, shape: tuple | None = None) -> np.ndarray:
        have = self.shape(name, layer)
        if shape is not None and tuple(have) != tuple(shape):
            raise UserError(f"checkpoint variable {name} has shape {list(have)}, layer {layer} of the YAML needs "
                            f"{list(shape)}")
        self.used.add(name)
        return np.asarray(self.reader.get_tensor(name))

    def check_unused(self, model_name: str) -> dict:
        """Variables under the model's scope that nothing used: optimizer slots are fine
        (`<used variable>/<slot>`), anything else means the YAML is not the checkpoint's."""
        slots, outside = 0, 0
        for name in sorted(self.shapes):
            if name in self.used:
                continue
            if not name.startswith(model_name + "/"):
                outside += 1
                continue
            owner = name.rsplit("/", 1)[0]
            if owner in self.used:
                slots += 1
                continue
            raise UserError(f"checkpoint variable {name} {list(self.shapes[name])} is not used by the YAML's model "
                            "(the checkpoint was trained with another description?)")
        return {"used": len(self.used), "optimizer_slots": slots, "outside_model_scope": outside}


# ---- graph ------------------------------------------------------------------------------

def _list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def plan(model: dict, root: dict) -> tuple[list[Step], str]:
    """Mayo's graph (mayo/net/graph.py Graph._add_module / _add_layer) as steps in execution
    order, each layer's inputs and output named by scoped tensor keys."""
    if not isinstance(model, dict) or "name" not in model or "graph" not in model or "layers" not in model:
        raise UserError("the Mayo YAML has no model (model.name, model.layers and model.graph are needed)")
    steps: list[Step] = []
    alias: dict = {}
    name = mc.resolve(model["name"], root)
    _module(model, (str(name),), ["input"], ["output"], steps, alias, root, ())

    def real(key):
        seen = 0
        while isinstance(key, str) and key in alias:
            key = alias[key]
            seen += 1
            if seen > 10000:
                raise UserError("the Mayo graph connects a tensor to itself")
        if isinstance(key, list):
            return [real(k) for k in key]
        return key

    for s in steps:
        s.inputs = [real(k) for k in s.inputs]
    out = real("output")
    produced = {s.output: s for s in steps}
    # keep what the output needs, in an order where inputs come first (Mayo: topological)
    needed, stack = set(), [out]
    while stack:
        k = stack.pop()
        for kk in (k if isinstance(k, list) else [k]):
            if kk in produced and kk not in needed:
                needed.add(kk)
                stack.extend(produced[kk].inputs)
            elif kk != "input" and kk not in produced:
                raise UserError(f"the Mayo graph reads tensor {kk!r} that no layer produces")
    ordered, ready, pending = [], {"input"}, [s for s in steps if s.output in needed]

    def flat(keys):
        for k in keys:
            yield from (k if isinstance(k, list) else [k])
    while pending:
        progress = [s for s in pending if all(k in ready for k in flat(s.inputs))]
        if not progress:
            raise UserError(f"the Mayo graph has a cycle through layer {pending[0].scope}")
        for s in progress:
            ordered.append(s)
            ready.add(s.output)
        pending = [s for s in pending if s not in progress]
    if out == "input":
        raise UserError("the Mayo graph's output is its input")
    return ordered, out


def _module(params: dict, path: tuple, froms: list, tos: list, steps, alias, root, stack):
    kwargs = params.get("kwargs") or {}
    values = {k: mc.resolve(params.get(k, d), root) for k, d in kwargs.items()}
    layers = mc.replace_kwargs(params.get("layers") or {}, values)
    graph = mc.replace_kwargs(params.get("graph"), values)

    def key(n):
        return "/".join((*path, str(n)))
    for f, i in zip(froms, _list(params.get("inputs", ["input"]))):
        alias[key(i)] = f
    for conn in _list(graph):
        if not isinstance(conn, dict) or "from" not in conn or "to" not in conn:
            raise UserError(f"Mayo graph of {'/'.join(path)}: a connection needs `from` and `to`, got {conn!r}")
        withs = [str(w) for w in _list(conn.get("with"))]
        for src, dst, layer in zip([conn["from"], *withs], [*withs, conn["to"]], [*withs, None]):
            src_keys = [key(s) for s in _list(src)]
            dst_keys = [key(d) for d in _list(dst)]
            if len(dst_keys) != 1:
                raise UserError(f"Mayo graph of {'/'.join(path)}: a layer with several outputs ({dst}) is not supported")
            ins = src_keys if len(src_keys) > 1 else src_keys[0]
            if layer is None:
                if ins != dst_keys[0]:
                    alias[dst_keys[0]] = ins
                continue
            if layer not in layers or not isinstance(layers[layer], dict):
                raise UserError(f"Mayo graph of {'/'.join(path)} uses layer {layer!r}, which model.layers does not define")
            lp = layers[layer]
            if lp.get("type") == "module":
                if (*path, layer) in stack:
                    raise UserError(f"Mayo module {layer} contains itself")
                _module(lp, (*path, layer), _list(ins), dst_keys, steps, alias, root, stack + ((*path, layer),))
            else:
                steps.append(Step(path, layer, mc.resolve(lp, root), [ins], dst_keys[0]))
    for o, t in zip(_list(params.get("outputs", ["output"])), tos):
        alias[t] = key(o)


# ---- layers -----------------------------------------------------------------------------

class NHWCFlatten(nn.Module):
    """slim.flatten of an NHWC tensor: features in (h, w, c) order."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.dim() == 4 else x.reshape(x.shape[0], -1)


class Squeeze(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x):
        if x.dim() == 4 and self.dims == (2, 3):  # one Flatten node: the batch axis stays free
            return torch.flatten(x, 1)
        for d in sorted(self.dims, reverse=True):
            x = x.squeeze(d)
        return x


class Add(nn.Module):
    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Mul(nn.Module):
    def forward(self, a, b):
        return a * b


class Concat(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, *xs):
        return torch.cat(xs, self.dim)


class _PadFn(torch.autograd.Function):
    """F.pad whose ONNX form is one Pad node with constant pads (the TorchScript exporter
    computes them with a chain of ops that leaves the fold without a static shape)."""

    @staticmethod
    def forward(ctx, x, pads, value):
        return F.pad(x, pads, value=value)

    @staticmethod
    def symbolic(g, x, pads, value):
        left, right, top, bottom = pads
        onnx_pads = g.op("Constant", value_t=torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64))
        fill = g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))
        return g.op("Pad", x, onnx_pads, fill, mode_s="constant")


class Pad(nn.Module):
    """Constant padding (left, right, top, bottom)."""

    def __init__(self, pads, value=0.0):
        super().__init__()
        self.pads, self.value = tuple(int(p) for p in pads), float(value)

    def forward(self, x):
        return _PadFn.apply(x, self.pads, self.value)


class AvgPoolSame(nn.Module):
    """TensorFlow's SAME average pooling: the window's sum over the valid pixels only."""

    def __init__(self, kernel, stride, pads, counts: torch.Tensor):
        super().__init__()
        self.kernel, self.stride, self.pads = kernel, stride, pads
        self.register_buffer("counts", counts)

    def forward(self, x):
        s = F.avg_pool2d(_PadFn.apply(x, self.pads, 0.0), self.kernel, self.stride, divisor_override=1)
        return s / self.counts


class Layer(nn.Module):
    """pad -> op -> normaliser -> netslim mask -> activation (absent parts are Identity)."""

    def __init__(self, op, pad=None, norm=None, mask=None, act=None):
        super().__init__()
        self.pad = pad or nn.Identity()
        self.op = op
        self.norm = norm or nn.Identity()
        self.mask = mask or nn.Identity()
        self.act = act or nn.Identity()

    def forward(self, x):
        return self.act(self.mask(self.norm(self.op(self.pad(x)))))


class MayoNet(nn.Module):
    """The Mayo graph: `program` lists (output key, submodule name, input keys)."""

    def __init__(self, name: str):
        super().__init__()
        self.mayo_name = name
        self.program: list[tuple[str, str, list]] = []
        self.output_key = "output"

    def add_layer(self, step: Step, module: nn.Module) -> str:
        parent: nn.Module = self
        parts = [re.sub(r"\W", "_", p) for p in step.path[1:]] + [re.sub(r"\W", "_", step.name)]
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], module)
        qualified = ".".join(parts)
        self.program.append((step.output, qualified, step.inputs))
        return qualified

    def forward(self, x):
        t = {"input": x}
        for out, name, ins in self.program:
            args = [[t[k] for k in i] if isinstance(i, list) else t[i] for i in ins]
            args = args[0] if len(args) == 1 and isinstance(args[0], list) else args
            t[out] = self.get_submodule(name)(*args)
        return t[self.output_key]


# ---- building ---------------------------------------------------------------------------

def _pair(v, what: str, layer: str) -> tuple[int, int]:
    if isinstance(v, bool) or v is None:
        raise UserError(f"Mayo layer {layer}: {what} {v!r} is not a size")
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise UserError(f"Mayo layer {layer}: {what} {v!r} is not an integer or [h, w]")


def _same_pads(size: int, k: int, s: int, rate: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME: out = ceil(in / s); the odd padding pixel goes after."""
    eff = (k - 1) * rate + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _padding(padding, hw, kernel, stride, rate, layer) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) zeros before the op; None for VALID. Numbers: Mayo's
    instantiate_numeric_padding ([h, w], each an int or [before, after])."""
    if padding is None:
        padding = "SAME"
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return None
        if p != "SAME":
            raise UserError(f"Mayo layer {layer}: padding {padding!r} is not same, valid or a number")
        t, b = _same_pads(hw[0], kernel[0], stride[0], rate[0])
        left, r = _same_pads(hw[1], kernel[1], stride[1], rate[1])
        return (left, r, t, b)
    if isinstance(padding, int) and not isinstance(padding, bool):
        return (padding,) * 4
    if isinstance(padding, (list, tuple)) and len(padding) == 2:
        ph, pw = ([p, p] if isinstance(p, int) else list(p) for p in padding)
        return (pw[0], pw[1], ph[0], ph[1])
    raise UserError(f"Mayo layer {layer}: padding {padding!r} is not understood")


def _split_pads(pads):
    """Symmetric zero padding goes into the conv itself (one node, foldable); an asymmetric
    one stays a Pad before it. Returns (pre-pad or None, conv padding (h, w))."""
    if not pads:
        return None, (0, 0)
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return None, (top, left)
    return pads, (0, 0)


def _fn_name(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise UserError(f"Mayo function {v!r} is not a dotted name")
    return v


def _activation(params: dict, layer: str, default: str | None = "relu"):
    if "activation_fn" in params:
        fn = _fn_name(params["activation_fn"])
    else:
        fn = default
    if fn is None:
        return None, None
    short = fn.rsplit(".", 1)[-1]
    if short not in ACTIVATIONS or not (fn == short or fn.startswith(("tensorflow.nn.", "tf.nn."))):
        raise UserError(f"Mayo layer {layer}: activation_fn {fn} is not supported "
                        f"(tensorflow.nn.{', tensorflow.nn.'.join(ACTIVATIONS)} or null)")
    if params.get("activation_params"):
        raise UserError(f"Mayo layer {layer}: activation_params are not supported")
    return short, ACTIVATIONS[short]()


class Builder:
    def __init__(self, variables: Variables, update_slimmers: bool):
        self.v = variables
        self.update_slimmers = update_slimmers
        self.slimmers: list[dict] = []  # for the summary / re-derivation
        self.gated: list[str] = []
        self.notes: list[str] = []
        self.global_threshold: float | None = None
        self.gated_paths: list[tuple] = []

    # -- pieces
    def weight(self, name, layer, shape=None):
        return torch.from_numpy(np.ascontiguousarray(self.v.get(name, layer, shape), dtype=np.float32))

    def batch_norm(self, scope: str, layer: str, nparams: dict, channels: int, dims: int = 2):
        nparams = dict(nparams or {})
        center, scale = nparams.pop("center", True), nparams.pop("scale", False)
        eps = float(nparams.pop("epsilon", 0.001))
        for k in nparams:
            if k not in ("decay", "is_training", "fused", "updates_collections", "zero_debias_moving_mean",
                         "param_initializers", "param_regularizers", "trainable"):
                raise UserError(f"Mayo layer {layer}: normalizer_params.{k} is not supported")
        bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, eps=eps)
        with torch.no_grad():
            bn.running_mean.copy_(self.weight(f"{scope}/BatchNorm/moving_mean", layer, (channels,)))
            bn.running_var.copy_(self.weight(f"{scope}/BatchNorm/moving_variance", layer, (channels,)))
            bn.weight.copy_(self.weight(f"{scope}/BatchNorm/gamma", layer, (channels,)) if scale
                            else torch.ones(channels))
            bn.bias.copy_(self.weight(f"{scope}/BatchNorm/beta", layer, (channels,)) if center
                          else torch.zeros(channels))
        return bn

    def normalizer(self, params, scope, layer, channels, dims=2):
        fn = _fn_name(params.get("normalizer_fn"))
        if fn is None:
            return None
        if fn not in BATCH_NORM:
            raise UserError(f"Mayo layer {layer}: normalizer_fn {fn} is not supported (slim.batch_norm or null)")
        return self.batch_norm(scope, layer, params.get("normalizer_params"), channels, dims)

    def overriders(self, params, layer, gated: bool) -> dict | None:
        """The netslim overrider of this layer (its parameters), refusing everything else."""
        found = None
        for key, group in (params.get("overrider") or {}).items():
            if not group:
                continue
            if key == "gradient":
                self.notes.append(f"{layer}: gradient overriders act in training only")
                continue
            items = group.items() if isinstance(group, dict) else []
            if not isinstance(group, dict):
                raise UserError(f"Mayo layer {layer}: overrider.{key} is not a mapping of named overriders")
            for oname, o in items:
                if not o:
                    continue
                otype = str((o or {}).get("type", "")) if isinstance(o, dict) else ""
                short = otype.rsplit(".", 1)[-1]
                if short in QUANTIZERS:
                    raise UserError(f"Mayo layer {layer}: quantization overrider {otype} ({key}.{oname}) is not "
                                    "supported: gate2deploy imports FBS gating and network slimming only")
                if short != "NetworkSlimmer" or key != "activation":
                    raise UserError(f"Mayo layer {layer}: overrider {otype or oname!r} on {key} is not supported "
                                    "(only mayo.override.NetworkSlimmer on activation)")
                if gated:
                    raise UserError(f"Mayo layer {layer}: NetworkSlimmer on a gated_convolution cannot run in Mayo "
                                    "(its parametric BatchNorm has no gamma; NetworkSlimmer.gamma fails)")
                if found is not None:
                    raise UserError(f"Mayo layer {layer}: two NetworkSlimmer overriders")
                found = o
        return found

    def slim_mask(self, o: dict, scope: str, layer: str, channels: int, has_gamma: bool):
        if not has_gamma:
            raise UserError(f"Mayo layer {layer}: NetworkSlimmer needs the layer's BatchNorm gamma "
                            "(normalizer_params.scale: true)")
        base = f"{scope}/activations/NetworkSlimmer"
        mask = self.v.get(f"{base}.mask", layer, (channels,)).astype(bool)
        enable = bool(self.v.get(f"{base}.enable", layer, ()))
        gamma = self.v.get(f"{scope}/BatchNorm/gamma", layer, (channels,)).astype(np.float64)
        module = ChannelMask(torch.from_numpy(mask.astype(np.float32)))
        module._source_name = f"mayo NetworkSlimmer {scope}"
        entry = {"layer": scope, "module": module, "stored": mask, "gamma": gamma, "enable": enable,
                 "density": float(o.get("density", 1.0)), "should_update": bool(o.get("should_update", True)),
                 "global_threshold": bool(o.get("global_threshold", True)),
                 "incremental": bool(o.get("incremental", False))}
        self.slimmers.append(entry)
        return module if enable else None

    # -- layer types
    def build(self, step: Step, xs: list[torch.Tensor]) -> nn.Module:
        t = step.params.get("type")
        fn = getattr(self, f"layer_{t}", None) if isinstance(t, str) else None
        if fn is None:
            raise UserError(f"Mayo layer {step.scope}: layer type {t!r} is not supported")
        return fn(step, step.params, xs if len(xs) > 1 else xs[0])

    def _conv_geometry(self, p, layer, x, default_stride=1):
        kernel = _pair(p.get("kernel_size"), "kernel_size", layer)
        stride = _pair(p.get("stride", default_stride), "stride", layer)
        rate = _pair(p.get("rate", 1), "rate", layer)
        pads = _padding(p.get("padding", "SAME"), x.shape[2:], kernel, stride, rate, layer)
        return kernel, stride, rate, pads

    def _num_outputs(self, p, name, layer, axis=-1):
        n = p.get("num_outputs")
        if isinstance(n, mc.Unresolved):
            shape = self.v.shape(name, layer)
            self.notes.append(f"{layer}: num_outputs $({n.key}) read from the checkpoint ({shape[axis]})")
            return int(shape[axis])
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise UserError(f"Mayo layer {layer}: num_outputs {n!r} is not a positive integer")
        return n

    def layer_convolution(self, step, p, x):
        layer, scope = step.scope, step.scope
        if int(p.get("num_groups", 1)) != 1:
            raise UserError(f"Mayo layer {layer}: grouped convolution (num_groups) is not supported")
        if p.get("force_biases"):
            raise UserError(f"Mayo layer {layer}: force_biases is not supported")
        kernel, stride, rate, pads = self._conv_geometry(p, layer, x)
        cin = x.shape[1]
        cout = self._num_outputs(p, f"{scope}/weights", layer)
        w = self.weight(f"{scope}/weights", layer, (*kernel, cin, cout)).permute(3, 2, 0, 1)
        norm = self.normalizer(p, scope, layer, cout)
        use_bias = norm is None and ("biases_initializer" not in p or p["biases_initializer"])
        pads, conv_pad = _split_pads(pads)
        conv = nn.Conv2d(cin, cout, kernel, stride, conv_pad, rate, bias=bool(use_bias))
        with torch.no_grad():
            conv.weight.copy_(w)
        return self._plain_layer(p, layer, conv, pads, norm, use_bias)

    def layer_depthwise_convolution(self, step, p, x):
        layer = scope = step.scope
        kernel, stride, rate, pads = self._conv_geometry(p, layer, x)
        c = x.shape[1]
        m = int(p.get("depth_multiplier", 1))
        w = self.weight(f"{scope}/depthwise_weights", layer, (*kernel, c, m))
        w = w.permute(2, 3, 0, 1).reshape(c * m, 1, *kernel)
        norm = self.normalizer(p, scope, layer, c * m)
        use_bias = norm is None and ("biases_initializer" not in p or p["biases_initializer"])
        pads, conv_pad = _split_pads(pads)
        conv = nn.Conv2d(c, c * m, kernel, stride, conv_pad, rate, groups=c, bias=bool(use_bias))
        with torch.no_grad():
            conv.weight.copy_(w)
        return self._plain_layer(p, layer, conv, pads, norm, use_bias)

    def layer_fully_connected(self, step, p, x):
        layer = scope = step.scope
        if x.dim() != 2:
            raise UserError(f"Mayo layer {layer}: fully_connected on a {x.dim()}-D tensor (flatten it first)")
        cin = x.shape[1]
        cout = self._num_outputs(p, f"{scope}/weights", layer)
        norm = self.normalizer(p, scope, layer, cout, dims=1)
        use_bias = norm is None and ("biases_initializer" not in p or p["biases_initializer"])
        fc = nn.Linear(cin, cout, bias=bool(use_bias))
        with torch.no_grad():
            fc.weight.copy_(self.weight(f"{scope}/weights", layer, (cin, cout)).t())
        return self._plain_layer(p, layer, fc, None, norm, use_bias)

    def _plain_layer(self, p, layer, op, pads, norm, use_bias) -> Layer:
        """A conv / depthwise / fully-connected layer's common tail (scope = layer name): its
        biases (only without a normalizer, as slim does), the netslim mask of its overrider,
        its activation."""
        cout = op.weight.shape[0]
        if use_bias:
            with torch.no_grad():
                op.bias.copy_(self.weight(f"{layer}/biases", layer, (cout,)))
        o = self.overriders(p, layer, gated=False)
        mask = None
        if o is not None:
            has_gamma = norm is not None and bool((p.get("normalizer_params") or {}).get("scale", False))
            mask = self.slim_mask(o, layer, layer, cout, has_gamma)
        _, act = _activation(p, layer)
        return Layer(op, Pad(pads) if pads else None, norm, mask, act)

    def layer_gated_convolution(self, step, p, x):
        layer = scope = step.scope
        g = dict(p.get("gate_params") or {})
        if "density" not in g:
            raise UserError(f"Mayo layer {layer}: gate_params.density must be specified")
        policy = g.get("policy")
        if policy != "parametric":
            raise UserError(f"Mayo layer {layer}: gate policy {policy!r} is not supported (parametric only)")
        if g.get("granularity", "channel") != "channel":
            raise UserError(f"Mayo layer {layer}: gate granularity {g.get('granularity')!r} is not supported")
        for key, ok in (("norm", "batch"), ("parametric_beta", False), ("add_beta_first", False)):
            if g.get(key, ok) != ok:
                raise UserError(f"Mayo layer {layer}: gate_params.{key} = {g[key]!r} is not supported")
        density = float(g["density"])
        if not 0 < density <= 1:
            raise UserError(f"Mayo layer {layer}: gate density {density} is out of range (0, 1]")
        pool = g.get("pool", "avg")
        if pool not in FBSConv2d.POOLS:
            raise UserError(f"Mayo layer {layer}: gate pool {pool!r} is not one of {FBSConv2d.POOLS}")
        threshold_mode = g.get("threshold", "online")
        enable = bool(g.get("enable", True))
        factor = g.get("factor", 0) or 0  # Mayo: `if self.factor > 0`, ceil(num_outputs / factor): any number
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise UserError(f"Mayo layer {layer}: gate_params.factor must be a number, not {factor!r}")
        if _fn_name(p.get("normalizer_fn")) not in BATCH_NORM:
            raise UserError(f"Mayo layer {layer}: the parametric gate needs normalizer_fn slim.batch_norm")
        nparams = dict(p.get("normalizer_params") or {})
        if not nparams.get("scale", False):
            raise UserError(f"Mayo layer {layer}: the parametric gate needs normalizer_params.scale: true")
        if nparams.get("center", True) is False:
            raise UserError(f"Mayo layer {layer}: the parametric gate with normalizer_params.center: false does not "
                            "run in Mayo (ParametricGatedConvolution._add_beta returns None)")
        self.overriders(p, layer, gated=True)
        act_name, _ = _activation(p, layer)
        if act_name not in (None, "relu"):
            raise UserError(f"Mayo layer {layer}: a gated convolution with activation {act_name} is not supported")
        kernel, stride, rate, pads = self._conv_geometry(p, layer, x)
        cin, cout = x.shape[1], self._num_outputs(p, f"{scope}/weights", layer)
        numeric = not isinstance(p.get("padding", "SAME"), str)
        pre_pad, conv_pad, pool_pads, rescale = None, (0, 0), (0, 0, 0, 0), 1.0
        if pads:
            left, right, top, bottom = pads
            symmetric = left == right and top == bottom
            if numeric and symmetric:  # padded before: the saliency sees the zeros
                conv_pad, pool_pads = (top, left), (top, left, bottom, right)
            elif numeric:
                pre_pad = Pad(pads)
            elif symmetric:  # TensorFlow SAME inside the conv: the saliency does not see them
                conv_pad = (top, left)
            else:
                if pool == "max":
                    raise UserError(f"Mayo layer {layer}: max-pool saliency with an asymmetric SAME padding is not "
                                    "supported")
                pre_pad = Pad(pads)
                h, w = x.shape[2:]
                rescale = (h + top + bottom) * (w + left + right) / (h * w)
        hidden = math.ceil(cout / factor) if factor > 0 else None
        eps = float(nparams.get("epsilon", 0.001))
        threshold = None
        if not enable and threshold_mode == "local" and self.v.has(f"{scope}/gate/threshold"):
            # A disabled gate computes no actives in its forward, but its sparsity regularizer
            # does (gate/sparse.py regularize -> actives -> _threshold_variable), which
            # creates the layer's threshold variable: in the checkpoint, and unused here.
            self.v.get(f"{scope}/gate/threshold", layer, ())
        if enable and threshold_mode == "local":
            threshold = float(self.v.get(f"{scope}/gate/threshold", layer, ()))
        elif enable and threshold_mode == "global":
            threshold = self._global_threshold(step)
        elif threshold_mode not in ("online", "local", "global"):
            raise UserError(f"Mayo layer {layer}: gate threshold {threshold_mode!r} is not online, local or global")
        fbs = FBSConv2d(cin, cout, kernel, stride, conv_pad, rate, density=density if enable else 1.0, pool=pool,
                        hidden=hidden, eps=eps, activation=act_name, pool_pads=pool_pads, threshold=threshold)
        with torch.no_grad():
            fbs.conv.weight.copy_(self.weight(f"{scope}/weights", layer, (*kernel, cin, cout)).permute(3, 2, 0, 1))
            fbs.bn.running_mean.copy_(self.weight(f"{scope}/BatchNorm/moving_mean", layer, (cout,)))
            fbs.bn.running_var.copy_(self.weight(f"{scope}/BatchNorm/moving_variance", layer, (cout,)))
            fbs.beta.copy_(self.weight(f"{scope}/gate/shift", layer, (cout,)))
            first_in = cin
            if hidden:
                fbs.gate_hidden.weight.copy_(self.weight(f"{scope}/gate/factor/weights", layer,
                                                         (1, 1, cin, hidden))[0, 0].t() * rescale)
                fbs.gate_hidden.bias.copy_(self.weight(f"{scope}/gate/factor/biases", layer, (hidden,)))
                first_in, rescale = hidden, 1.0
            fbs.gate.weight.copy_(self.weight(f"{scope}/gate/weights", layer, (1, 1, first_in, cout))[0, 0].t()
                                  * rescale)
            fbs.gate.bias.copy_(self.weight(f"{scope}/gate/biases", layer, (cout,)))
        self.gated.append(scope)
        return Layer(fbs, pre_pad) if pre_pad is not None else fbs

    def _global_threshold(self, step) -> float:
        if self.global_threshold is None:
            candidates = ["/".join(step.path[:i]) + "/gate/threshold" for i in range(len(step.path), 0, -1)]
            found = [c for c in candidates if self.v.has(c)]
            if not found:
                raise UserError(f"checkpoint {self.v.prefix} lacks the global gate threshold "
                                f"({candidates[-1]}) that layer {step.scope}'s threshold: global needs")
            self.global_threshold = float(self.v.get(found[0], step.scope, ()))
        return self.global_threshold

    def _pool(self, step, p, x, kind):
        layer = step.scope
        h, w = x.shape[2:]
        k = p.get("kernel_size")
        if k == "global":
            k = [h, w]
        k = [k, k] if isinstance(k, int) or k is None else list(k)
        k = [h if k[0] is None else k[0], w if k[1] is None else k[1]]
        kernel = (min(h, int(k[0])), min(w, int(k[1])))  # _reduce_kernel_size_for_small_input
        stride = _pair(p.get("stride", 2), "stride", layer)
        if kernel == (1, 1) and p.get("stride", 2) == 1:
            return nn.Identity()
        padding = p.get("padding", "VALID")
        pads = _padding(padding, (h, w), kernel, stride, (1, 1), layer)
        if pads is None or not any(pads):
            op = nn.MaxPool2d(kernel, stride) if kind == "max" else nn.AvgPool2d(kernel, stride)
            return op
        if not isinstance(padding, str):  # zeros before the pool (instantiate_numeric_padding)
            op = nn.MaxPool2d(kernel, stride) if kind == "max" else nn.AvgPool2d(kernel, stride)
            return Layer(op, Pad(pads))
        if kind == "max":
            return Layer(nn.MaxPool2d(kernel, stride), Pad(pads, float("-inf")))
        ones = torch.ones(1, 1, h, w)
        counts = F.avg_pool2d(F.pad(ones, pads), kernel, stride, divisor_override=1)
        return AvgPoolSame(kernel, stride, pads, counts)

    def layer_max_pool(self, step, p, x):
        return self._pool(step, p, x, "max")

    def layer_average_pool(self, step, p, x):
        return self._pool(step, p, x, "avg")

    def layer_dropout(self, step, p, x):
        return nn.Identity()

    def layer_identity(self, step, p, x):
        _, act = _activation(p, step.scope, default=None)
        return act or nn.Identity()

    def layer_activation(self, step, p, x):
        mode = p.get("mode")
        if mode == "leaky_relu":
            return nn.LeakyReLU(0.2)  # tf.nn.leaky_relu's default alpha
        if mode not in ACTIVATIONS:
            raise UserError(f"Mayo layer {step.scope}: activation mode {mode!r} is not supported")
        return ACTIVATIONS[mode]()

    def layer_batch_normalization(self, step, p, x):
        params = dict(p.get("normalizer_params") or {})
        params.update({k: v for k, v in p.items() if k in ("center", "scale", "epsilon", "decay")})
        return Layer(self.batch_norm(step.scope, step.scope, params, x.shape[1], 2 if x.dim() == 4 else 1),
                     act=_activation(p, step.scope, default=None)[1])

    def layer_flatten(self, step, p, x):
        return NHWCFlatten()

    def layer_squeeze(self, step, p, x):
        axes = _list(p.get("axis", p.get("squeeze_dims")))
        if not axes:
            raise UserError(f"Mayo layer {step.scope}: squeeze without an axis is not supported")
        dims = sorted(NHWC_TO_NCHW[int(a)] if x.dim() == 4 else int(a) % x.dim() for a in axes)
        if any(x.shape[d] != 1 for d in dims):
            raise UserError(f"Mayo layer {step.scope}: squeeze of axes {axes} whose size is not 1 "
                            f"(NHWC shape {[x.shape[0], *x.shape[2:], x.shape[1]]})")
        return Squeeze(dims)

    def layer_add(self, step, p, xs):
        return Add()

    def layer_mul(self, step, p, xs):
        return Mul()

    def layer_concat(self, step, p, xs):
        axis = int(p.get("axis", -1))
        return Concat(NHWC_TO_NCHW[axis] if xs[0].dim() == 4 else axis % xs[0].dim())

    def layer_softmax(self, step, p, x):
        return nn.Softmax(dim=-1 if x.dim() == 2 else 1)

    def layer_pad(self, step, p, x):
        pads = _padding(p.get("padding", 0), x.shape[2:], (1, 1), (1, 1), (1, 1), step.scope)
        return Pad(pads) if pads else nn.Identity()


def mayo_info(layers: list, model: nn.Module) -> dict:
    """Per-layer MACs and weights by Mayo's own `info` rules, in its plumbing layout
    ({items: [...], footer: {macs}}; mayo/net/tf/base.py `_layer_info`, Table.plumb):
    - convolution (mayo/net/tf/estimate.py `_estimate_convolution`): macs = Ho*Wo*Cout*kh*kw*Cin,
      weights = kh*kw*Cin*Cout + Cout (a bias counted even under BatchNorm); depthwise:
      kh*kw*Cout weights, Ho*Wo*Cout*kh*kw macs; fully_connected: macs = weights = in * out;
    - `apply_sparsity`: macs *= density(input) * density(output), weights *= active(in) *
      active(out) (depthwise: the output's only), truncated to int;
    - NetworkSlimmer.estimate (override/prune/netslim.py): density = active = kept / C,
      macs and weights scaled by them, and the next layer sees that density;
    - gated_convolution (net/tf/gate/layers.py `estimate_gated_convolution`,
      `_estimate_overhead`): the conv's cost at the gate's density, plus the gate's FC
      (int(Cin * density_in) * int(Cout * active) MACs and as many weights + int(Cout * active))
      and the gamma multiplication (Ho*Wo*Cout MACs). Mayo measures density and active from
      the eval run's gate history; here the online gate's nominal density ceil(C*d)/C is used
      and active = 1 (any channel is on for some input), local/global thresholds count as 1;
    - every other layer (pools, activations, dropout, flatten, add, ...) has no MACs and does
      not pass densities on (NetBase.generic_estimate returns {}); `add` joins masks in Mayo,
      which without per-sample masks is taken as dense here.
    """
    modules = dict(model.named_modules())
    info: dict[str, dict] = {}
    items, total = [], 0
    for step, name, in_shapes, out_shape in layers:
        t = step.params.get("type")
        src = step.inputs[0]
        src_info = {} if isinstance(src, list) else info.get(src, {})
        d_in, a_in = src_info.get("density", 1.0), src_info.get("active", 1.0)
        nhwc = [out_shape[1], out_shape[2], out_shape[0]] if len(out_shape) == 3 else list(out_shape)
        row = {"layer": step.scope, "shape": nhwc}
        out = {}
        if t in ("convolution", "gated_convolution", "depthwise_convolution"):
            mod = modules[name]
            core = mod.op if isinstance(mod, Layer) else mod  # Layer(conv | FBSConv2d) or FBSConv2d
            conv = core.conv if isinstance(core, FBSConv2d) else core
            kh, kw = conv.kernel_size
            cin, cout, ho, wo = in_shapes[0][0], out_shape[0], out_shape[1], out_shape[2]
            depthwise = t == "depthwise_convolution"
            macs = ho * wo * cout * kh * kw * (1 if depthwise else cin)
            weights = kh * kw * cout if depthwise else kh * kw * cin * cout + cout
            d_out = a_out = 1.0
            if isinstance(core, FBSConv2d) and core.threshold is None:
                d_out = math.ceil(cout * core.density) / cout
            full = d_out if depthwise else d_in * d_out
            macs_i = int(macs * full)
            weights_i = int(weights * a_out * (1 if depthwise else a_in))
            if t == "gated_convolution":
                fc = int(cin * d_in) * int(cout * a_out)
                macs_i += fc + ho * wo * cout
                weights_i += fc + int(cout * a_out)
            mask = getattr(mod, "mask", None)
            if isinstance(mask, ChannelMask):
                kept = int(mask.mask.sum()) / mask.mask.numel()  # Mayo: valids / totals, a Python float
                macs_i, weights_i, d_out, a_out = int(macs_i * kept), int(weights_i * kept), kept, kept
            out = {"density": d_out, "active": a_out}
            row.update(macs=macs_i, weights=weights_i, density=d_out, active=a_out)
            total += macs_i
        elif t == "fully_connected":
            cin, cout = in_shapes[0][0], out_shape[0]
            macs = cin * cout
            row.update(macs=int(macs * d_in), weights=int(macs * a_in), density=1.0, active=1.0)
            total += row["macs"]
            out = {"density": 1.0, "active": 1.0}
        info[step.output] = out
        items.append(row)
    return {"items": items, "footer": {"macs": total}}


def without_slim_masks(model: nn.Module) -> nn.Module:
    """The model with its NetworkSlimmer masks taken out (`profile` measures the dense
    layers at the widths it sweeps; the masks are a configuration, not an op to time)."""
    for m in model.modules():
        if isinstance(m, Layer) and isinstance(m.mask, ChannelMask):
            m.mask = nn.Identity()
    return model


def _recompute_slim_masks(slimmers: list[dict]) -> dict:
    """Mayo's `overriders-update` for NetworkSlimmer (mayo/override/prune/netslim.py
    `_threshold`, `_global_threshold`, `_updated_mask`)."""
    def threshold(values, density):
        if not len(values):
            return 0.0
        k = math.ceil(len(values) * density)
        return 0.0 if k == len(values) else float(np.sort(values)[-k - 1])

    summary = {}
    updating = [s for s in slimmers if s["should_update"]]
    # One global threshold for all: session.overriders_update calls update() layer by layer;
    # the first global slimmer's _global_threshold pools every updating slimmer's gammas
    # (filtered by the active masks if *its own* `incremental` is set), thresholds them by
    # *its own* density, then flushes the gammas and stores the threshold in the estimator,
    # which every later global slimmer reuses (estimator.max_len == 0): later slimmers'
    # densities and flags do not change it.
    shared = None
    for s in updating:
        if s["global_threshold"]:
            if shared is None:
                pool = np.concatenate([u["gamma"][u["stored"]] if s["incremental"] else u["gamma"] for u in updating])
                shared = threshold(pool, s["density"])
            t = shared
        else:
            own = s["gamma"][s["stored"]] if s["incremental"] else s["gamma"]
            t = threshold(own, s["density"])
        new = s["gamma"] > t
        if s["incremental"]:
            new &= s["stored"]
        s["stored"] = new
        s["module"].mask.copy_(torch.from_numpy(new.astype(np.float32)))
        summary[s["layer"]] = t
    return summary


def build(checkpoint: str, yamls: list[str], overrides: list[str], root: str | None, example: torch.Tensor,
          dataset: str | None = None, update_slimmers: bool = False) -> MayoBuild:
    """The PyTorch model of a Mayo checkpoint + YAML (see the module docstring)."""
    config, root_path, files = mc.load(([dataset] if dataset else []) + list(yamls), overrides, root)
    steps, out = plan(config.get("model"), config)
    prefix = checkpoint_prefix(checkpoint)
    variables = Variables(prefix)
    builder = Builder(variables, update_slimmers)
    net = MayoNet(steps[0].path[0] if steps else "model")
    if example.dim() != 4:
        raise UserError(f"a Mayo network takes images: --input-shape N,C,H,W, not {list(example.shape)}")
    values = {"input": torch.zeros(1, *example.shape[1:])}
    layers = []
    with torch.no_grad():
        for step in steps:
            xs = [[values[k] for k in i] if isinstance(i, list) else values[i] for i in step.inputs]
            xs = xs[0] if len(xs) == 1 and isinstance(xs[0], list) else xs
            module = builder.build(step, xs).eval()
            try:
                y = module(*xs)
            except Exception as exc:  # noqa: BLE001 - shapes not fitting the layer
                first = first_line(exc)
                raise UserError(f"Mayo layer {step.scope} does not fit its input "
                                f"{[list(x.shape) for x in xs]}: {first}") from None
            values[step.output] = y
            name = net.add_layer(step, module)
            layers.append((step, name, [tuple(x.shape[1:]) for x in xs], tuple(y.shape[1:])))
    net.output_key = out
    usage = variables.check_unused(net.mayo_name)
    thresholds = _recompute_slim_masks(builder.slimmers) if update_slimmers and builder.slimmers else None
    summary = {
        "yaml": [str(f) for f in files], "root": str(root_path) if root_path else None, "checkpoint": prefix,
        "gated_layers": builder.gated,
        "netslim": {s["layer"]: {"kept": int(s["stored"].sum()), "channels": int(s["stored"].size),
                                 "enabled": s["enable"]} for s in builder.slimmers},
        "netslim_masks": "recomputed (overriders-update)" if thresholds is not None else "stored",
        "variables": usage, "notes": builder.notes,
    }
    if thresholds is not None:
        summary["netslim_thresholds"] = thresholds
    summary["info"] = mayo_info(layers, net)
    return MayoBuild(net.eval(), summary, layers)

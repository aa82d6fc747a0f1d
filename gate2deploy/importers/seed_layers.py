"""The seeds' own layer classes inside a user's model -> gate2deploy's gated modules.

Contract
--------
`lower_seed_layers(model, example, fbs_rate=None)` runs in `frontend.build_gated_model` after
the checkpoint's weights are loaded and the model is in eval mode, before it is run or captured:

1. It walks the model and recognises the seeds' layer objects BY STRUCTURE AND ATTRIBUTES
   (their parameters, buffers, sub-modules and plain attributes as the seed defines them); the
   class name is only a hint, used to name look-alikes that cannot be lowered.
2. Each recognised layer is replaced by gate2deploy's module of the same function (which
   exports as one gated ONNX node), with the seed layer's own weights (`load_state_dict`,
   strict) and the hyper-parameters read from the seed object itself. Nothing is defaulted:
   an attribute the rule needs and the object lacks leaves the layer unlowered (below).
3. Each replacement is checked on the example input: fed the input the seed layer received in
   one forward of the whole model, it must return the seed layer's output (max|diff| <=
   PROBE_RTOL * max|seed output|); otherwise the seed layer stays as it is. The whole model's
   output with and without the replacements on the example is reported too
   (`max_rel_err_vs_seed_layers_on_example`), since export's own verification then compares
   the compiled model with the model that holds the replacements.
4. A module that is gated (a recognised CG/PG/FBS layer) or looks gated (class name hint, or a
   `threshold`/`mask`/`gate` tensor or a `gate` sub-module) but is not lowered is named in a
   warning on stderr and in the export report (`unlowered_gated_layers`); it is then exported
   as a generic graph of its own forward (still verified), never silently.

Recognition rules (seed files and the functions they follow)
-----------------------------------------------------------
- dnn-gating `utils/cg_utils.py: CGConv2d` -> `gated.CGConv2d`: an `nn.Conv2d` with a
  Parameter `mask` of the weight's shape, a `threshold` [1, O, 1, 1], a sub-module `bn` =
  BatchNorm2d(O, affine=False), and the attributes `p`, `shuffle`, `alpha` (the seed stores
  exactly these; `use_group` is not stored, the `mask` carries it). Its forward shuffles the
  input by `channel_shuffle(x, p)` when `shuffle`, so `p` and `shuffle` decide the output.
- dnn-gating `utils/pg_utils.py: PGConv2d` -> `gated.PGConv2d`: an `nn.Conv2d` with a
  `threshold` [1, O, 1, 1] and the quantizer sub-modules `quantize_w`, `quantize_a`
  (`TorchQuantize`, wrapping `nn.Identity` = 0 bits, `TorchBinarize` = 1 bit, or
  `TorchRoundToBits` with `bits`) and `trunc_a` (`TorchTruncate` with `b`, `bh`); wbits,
  abits and pred_bits are read from them (abits must equal `trunc_a.b`), `alpha` and
  `weight_rescale` from the object.
- `utils/pg_utils.py: QuantizedConv2d` -> `gated.QuantizedConv2d`: an `nn.Conv2d` with
  `quantize_w`, `quantize_a` and no `threshold`.
- `utils/pg_utils.py: PactReLU` -> `gated.PactReLU`: a leaf module whose only state is the
  scalar Parameter `upper_bound`.
- PyTorch-FBS `models/custom.py: ChannelPruning`: `contents` (nn.Sequential), `gate`
  (nn.Linear in_channels -> out_channels), `in_channels`, `out_channels`, `rate`. Its forward
  zeroes the k = int(O * (1 - rate)) least salient output channels (saliency relu(gate(
  avgpool|x|))) and scales the others by O * g / sum(kept g). At a rate with k = 0 it is
  exactly its dense `contents` (listed as "dense"). Otherwise it is NOT lowered: the FBSConv
  op (runtimes/OPS.md, Mayo's FBS) has pools of |x| (`pool="l1"`) and an optional ReLU, but
  no per-sample renormalisation O / sum(kept g), and it gates an affine-free BN (gamma, then
  beta, before the ReLU) where PyTorch-FBS scales after its conv + BN + ReLU; so these blocks
  are warned about and listed as unlowered.

Hyper-parameters that are not in the checkpoint (issue 12 point 3)
------------------------------------------------------------------
They come from the user's model object (the seeds' constructors store them on it, and the
seeds' model files take them from the training script's kwargs) or from a flag:
- CG `p`, `shuffle`, `alpha`; PG bit widths, `alpha`, `weight_rescale`: from the object.
- PyTorch-FBS `rate`: the seed's constructor always sets 1.0 and its main.py overwrites it
  before each training phase (the checkpoint's file name `ckpts/<rate>-best.pth` is the only
  record). So `--fbs-rate R` sets it on every block; without the flag a block whose rate is
  still the constructor's 1.0 is refused (exit 2 naming --fbs-rate), and a rate the user's
  model code set (anything else) is used.
The project's built-in builders (gate2deploy.models) take the same hyper-parameters as
required keyword arguments (--model-kwargs); see gate2deploy/models/dnn_gating.py and fbs.py.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import gated
from ..errors import UserError, first_line

PROBE_RTOL = 1e-6
_NAME_HINT = re.compile(r"Gate|Gating|^gat(e|ed|ing)|CGConv|PGConv|FBS|ChannelPruning")
_GATE_TENSORS = ("threshold", "mask", "gate", "gates")
_GATE_CHILDREN = ("gate", "gates", "gating_module")


@dataclass
class _Found:
    name: str
    module: nn.Module
    kind: str  # cg | pg | qconv | pact | pytorch-fbs | dense (PyTorch-FBS dropping nothing) | gate-like
    build: Callable[[], nn.Module] | None = None
    reason: str = ""
    hyper: dict = field(default_factory=dict)

    @property
    def gated(self) -> bool:
        return self.kind in ("cg", "pg", "pytorch-fbs", "gate-like")


# --------------------------------------------------------------------------- recognition

def _own(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "gate2deploy"


def _local_tensor(m: nn.Module, name: str) -> torch.Tensor | None:
    t = m._parameters.get(name)
    return t if t is not None else m._buffers.get(name)


def _attrs(m: nn.Module, *names: str) -> tuple[dict, list[str]]:
    values = {n: getattr(m, n) for n in names if hasattr(m, n)}
    return values, [n for n in names if n not in values]


def _quantizer_bits(q) -> int | None:
    """Bits of a dnn-gating TorchQuantize (pg_utils.py): Identity 0, TorchBinarize 1,
    TorchRoundToBits `bits`; None if it is none of these."""
    inner = getattr(q, "quantize", q)
    if isinstance(inner, nn.Identity):
        return 0
    bits = getattr(inner, "bits", None)
    if isinstance(bits, int) and bits > 1:
        return bits
    if isinstance(inner, nn.Module) and "Binar" in type(inner).__name__ and not list(inner.parameters()):
        return 1
    return None


def _conv_geometry(m: nn.Conv2d) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                bias=m.bias is not None, padding_mode=m.padding_mode)


def _has_threshold(m: nn.Conv2d) -> bool:
    t = _local_tensor(m, "threshold")
    return t is not None and tuple(t.shape) == (1, m.out_channels, 1, 1)


def _block_diagonal(mask: torch.Tensor, p: int) -> bool:
    o, i = mask.shape[:2]
    ref = torch.zeros_like(mask)
    for c in range(p):
        ref[c * int(o / p):(c + 1) * int(o / p), c * int(i / p):(c + 1) * int(i / p)] = 1
    return torch.equal(mask, ref)


def _as_cg(name: str, m: nn.Conv2d) -> _Found:
    values, missing = _attrs(m, "p", "shuffle", "alpha")
    if missing:
        return _Found(name, m, "cg", reason=f"has no attribute {', '.join(missing)} (dnn-gating CGConv2d stores "
                                              "p, shuffle and alpha; they decide the output)")
    bn = m.bn
    if not (bn.track_running_stats and bn.running_mean is not None):
        return _Found(name, m, "cg", reason="its bn has no running statistics (eval would use batch statistics)")
    p, shuffle, alpha = int(values["p"]), bool(values["shuffle"]), float(values["alpha"])
    if shuffle and m.in_channels % p:
        return _Found(name, m, "cg", reason=f"shuffle with p={p} does not divide {m.in_channels} input channels")
    use_group = _block_diagonal(m.mask.data, p)

    def build():
        new = gated.CGConv2d(**_conv_geometry(m), use_group=use_group, shuffle=shuffle, p=p,
                             th=float(getattr(m, "th", 0.0)), alpha=alpha)
        new.bn.eps = bn.eps
        new.bn.momentum = bn.momentum
        return new
    return _Found(name, m, "cg", build,
                  hyper={"p": p, "shuffle": shuffle, "alpha": alpha, "use_group (from mask)": use_group})


def _as_pg(name: str, m: nn.Conv2d) -> _Found:
    values, missing = _attrs(m, "alpha", "weight_rescale")
    if missing:
        return _Found(name, m, "pg", reason=f"has no attribute {', '.join(missing)} (dnn-gating PGConv2d)")
    wbits, abits = _quantizer_bits(m.quantize_w), _quantizer_bits(m.quantize_a)
    b, bh = getattr(m.trunc_a, "b", None), getattr(m.trunc_a, "bh", None)
    if wbits is None or abits is None or not isinstance(b, int) or not isinstance(bh, int):
        return _Found(name, m, "pg", reason="its quantizers are not dnn-gating TorchQuantize/TorchTruncate "
                                             "(cannot read wbits/abits/pred_bits)")
    if abits != b:
        return _Found(name, m, "pg", reason=f"quantize_a has {abits} bits but trunc_a {b}: the PGConv op "
                                             "quantizes both parts with the same abits")
    alpha, rescale = float(values["alpha"]), float(values["weight_rescale"])

    def build():
        new = gated.PGConv2d(**_conv_geometry(m), wbits=wbits, abits=abits, pred_bits=bh, alpha=alpha)
        new.weight_rescale = rescale  # the seed's own value (np.sqrt(1/(k^2 C)) for 1-bit weights)
        return new
    return _Found(name, m, "pg", build, hyper={"wbits": wbits, "abits": abits, "pred_bits": bh,
                                                "alpha": alpha, "weight_rescale": rescale})


def _as_qconv(name: str, m: nn.Conv2d) -> _Found:
    wbits, abits = _quantizer_bits(m.quantize_w), _quantizer_bits(m.quantize_a)
    if wbits is None or abits is None or not hasattr(m, "weight_rescale"):
        return _Found(name, m, "qconv", reason="its quantizers are not dnn-gating TorchQuantize")
    rescale = float(m.weight_rescale)

    def build():
        new = gated.QuantizedConv2d(**_conv_geometry(m), wbits=wbits, abits=abits)
        new.weight_rescale = rescale
        return new
    return _Found(name, m, "qconv", build, hyper={"wbits": wbits, "abits": abits, "weight_rescale": rescale})


def _is_pact(m: nn.Module) -> bool:
    params = list(m.named_parameters(recurse=False))
    return (len(params) == 1 and params[0][0] == "upper_bound" and params[0][1].numel() == 1
            and not list(m.buffers(recurse=False)) and not list(m.children())
            and type(m).__module__.split(".")[0] != "torch")


def _is_pytorch_fbs(m: nn.Module) -> bool:
    gate, contents = getattr(m, "gate", None), getattr(m, "contents", None)
    return (isinstance(contents, nn.Sequential) and isinstance(gate, nn.Linear) and hasattr(m, "rate")
            and gate.in_features == getattr(m, "in_channels", None)
            and gate.out_features == getattr(m, "out_channels", None))


def _as_pytorch_fbs(name: str, m: nn.Module, fbs_rate: float | None) -> _Found:
    if fbs_rate is not None:
        m.rate = fbs_rate
    rate = float(m.rate)
    k = int(m.out_channels * (1.0 - rate))  # custom.py ChannelPruning.forward
    hyper = {"rate": rate, "suppressed_channels": k, "out_channels": m.out_channels}
    if k <= 0:
        return _Found(name, m, "dense", hyper=hyper)
    return _Found(name, m, "pytorch-fbs", hyper=hyper, reason=(
        f"PyTorch-FBS ChannelPruning at rate {rate:g} (drops {k} of {m.out_channels} channels): the FBSConv op "
        "computes Mayo's FBS, which has no per-sample renormalisation O/sum(kept saliency)"))


def _gate_like(m: nn.Module) -> str | None:
    why = []
    if _NAME_HINT.search(type(m).__name__):
        why.append("class name")
    why += [f"tensor '{n}'" for n in _GATE_TENSORS if _local_tensor(m, n) is not None]
    why += [f"sub-module '{n}'" for n in _GATE_CHILDREN if n in m._modules]
    return ", ".join(why) or None


def _classify(name: str, m: nn.Module, fbs_rate: float | None) -> _Found | None:
    if isinstance(m, nn.Conv2d):
        mask, bn = _local_tensor(m, "mask"), m._modules.get("bn")
        quantizers = all(n in m._modules for n in ("quantize_w", "quantize_a"))
        if (mask is not None and tuple(mask.shape) == tuple(m.weight.shape) and _has_threshold(m)
                and isinstance(bn, nn.BatchNorm2d) and not bn.affine and bn.num_features == m.out_channels):
            return _as_cg(name, m)
        if _has_threshold(m) and quantizers and "trunc_a" in m._modules and mask is None:
            return _as_pg(name, m)
        if quantizers and _local_tensor(m, "threshold") is None and mask is None:
            return _as_qconv(name, m)
    if _is_pact(m):
        ub = float(m.upper_bound.detach().reshape(()))
        return _Found(name, m, "pact", lambda: gated.PactReLU(ub), hyper={"upper_bound": ub})
    if _is_pytorch_fbs(m):
        return _as_pytorch_fbs(name, m, fbs_rate)
    why = _gate_like(m)
    if why:
        return _Found(name, m, "gate-like", reason=f"not a gated layer gate2deploy recognises ({why} look gated)")
    return None


def _walk(module: nn.Module, prefix: str, fbs_rate: float | None, out: list[_Found]) -> None:
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if _own(child):
            continue  # gate2deploy's modules export themselves
        found = _classify(name, child, fbs_rate)
        if found is not None:
            out.append(found)
            if found.build is not None:
                continue  # its sub-modules (bn, quantizers) go with it
        _walk(child, name, fbs_rate, out)


# --------------------------------------------------------------------------- lowering

def _probe(model: nn.Module, example: torch.Tensor, modules: list[nn.Module]) -> dict | None:
    """One forward of the model recording each module's first (input, output), and the
    model's output under the key "model"; None when the model does not run on the example
    (the front end reports that itself)."""
    seen: dict = {}

    def hook(mod, args, output):
        if id(mod) not in seen and len(args) == 1 and isinstance(output, torch.Tensor):
            seen[id(mod)] = (args[0].detach().clone(), output.detach().clone())

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            seen["model"] = model(example)
    except Exception:  # noqa: BLE001 - reported by the front end's own run
        return None
    finally:
        for h in handles:
            h.remove()
    return seen


def _mismatch(new: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> str | None:
    try:
        with torch.no_grad():
            got = new(x)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot stand in for the seed layer"
        return first_line(exc)
    if got.shape != expected.shape:
        return f"gives shape {tuple(got.shape)}, the seed layer {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((got - expected).abs().max()) if expected.numel() else 0.0
    if not err <= PROBE_RTOL * max(scale, 1e-30):  # NaN fails too
        return (f"its forward differs from the seed rule on the example input (max|diff| {err:.3g}, "
                f"max|out| {scale:.3g}): not the seed's layer")
    return None


def _replace(model: nn.Module, swaps: dict[int, nn.Module]) -> None:
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[key] = swaps[id(child)]


def _build(found: _Found) -> nn.Module | str:
    try:
        new = found.build()
        new.load_state_dict(found.module.state_dict(), strict=True)
    except (ValueError, RuntimeError, UserError) as exc:
        return first_line(exc)
    ref = next(iter(found.module.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    return new.train(found.module.training)


def lower_seed_layers(model: nn.Module, example: torch.Tensor, fbs_rate: float | None = None) -> dict:
    """Recognise and replace the seeds' layers in `model` (in place); see the module docstring.
    Returns {} when there is nothing seed-like, else {"seed_layers": {...}} for the report."""
    if fbs_rate is not None and not 0.0 < fbs_rate <= 1.0:
        raise UserError(f"--fbs-rate {fbs_rate:g} is not in (0, 1] (the fraction of channels PyTorch-FBS keeps)")
    found: list[_Found] = []
    _walk(model, "", fbs_rate, found)
    fbs = [f for f in found if f.kind in ("pytorch-fbs", "dense")]
    if fbs_rate is not None and not fbs:
        raise UserError("--fbs-rate is given but the model has no PyTorch-FBS ChannelPruning block")
    placeholder = [f.name for f in fbs if fbs_rate is None and f.hyper["rate"] == 1.0]
    if placeholder:
        raise UserError(f"PyTorch-FBS block {placeholder[0]} has rate 1.0, the constructor's value that the seed's "
                        "main.py overwrites before training; the checkpoint does not store it: pass --fbs-rate")
    if not found:
        return {}

    lowerable = [f for f in found if f.build is not None]
    probe = _probe(model, example, [f.module for f in lowerable])
    swaps: dict[int, nn.Module] = {}
    lowered, not_replaced = [], []
    for f in lowerable:
        new = _build(f) if probe is not None else "the model does not run on the example input"
        if isinstance(new, nn.Module) and id(f.module) in probe:
            problem = _mismatch(new, *probe[id(f.module)])
            if problem:
                new = problem
        if isinstance(new, str):
            f.reason, f.build = new, None
            not_replaced.append(f)
            continue
        swaps[id(f.module)] = new
        lowered.append({"name": f.name, "seed_class": type(f.module).__name__, "as": type(new).__name__,
                        **f.hyper})
    _replace(model, swaps)
    check = None
    if swaps and isinstance(probe.get("model"), torch.Tensor):
        # The whole model, seed layers vs their replacements, on the example (reported; each
        # layer was already checked on its own input, so only a gate at a tie can differ).
        with torch.no_grad():
            after, before = model(example), probe["model"]
        scale = float(before.abs().max()) if before.numel() else 0.0
        check = float((after - before).abs().max()) / scale if scale > 0 else float((after - before).abs().max())

    unlowered = [f for f in found if f.build is None and f.gated]
    for f in unlowered:
        print(f"warning: gated layer {f.name} ({type(f.module).__name__}) is not lowered to a gated op: {f.reason}; "
              "it is exported as a generic graph of its own forward", file=sys.stderr)
    return {"seed_layers": {
        "lowered": lowered,
        "max_rel_err_vs_seed_layers_on_example": check,
        "unlowered": [{"name": f.name, "class": type(f.module).__name__, "reason": f.reason} for f in unlowered],
        "not_replaced": [{"name": f.name, "class": type(f.module).__name__, "reason": f.reason}
                         for f in not_replaced if not f.gated],
        "dense": [{"name": f.name, "class": type(f.module).__name__, **f.hyper}
                  for f in found if f.kind == "dense"],
    }}

"""Memory estimate of an export / run before anything large is allocated (issue 17).

The model is traced once on fake tensors (torch's FakeTensorMode: shapes only, no data) at
the largest batch the command will run, and every activation the forward creates is tallied;
views share their base's storage and are not counted twice. Tensors are tracked while alive,
so the figure is the forward's peak of live activations, as eager PyTorch holds them.

Estimate = weights x WEIGHT_COPIES + peak activations x ACTIVATION_COPIES + the input.
Decisions (the issue is silent on the formula):
- WEIGHT_COPIES = 4: the PyTorch model, the captured ONNX graph, the folded graph and the
  ONNX Runtime session that verifies it hold one copy each.
- ACTIVATION_COPIES = 2: the PyTorch reference forward and the ONNX Runtime run of
  verification; ORT's planner keeps about as much live as eager PyTorch does.
- The limit is `--max-memory` GiB; unset, the machine's available memory
  (/proc/meminfo MemAvailable) at start; where that cannot be read, no limit.
- A model the fake trace cannot run (data-dependent control flow, custom kernels without
  a fake implementation) gets no estimate: the real forward that follows diagnoses it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import OptionError

WEIGHT_COPIES = 4
ACTIVATION_COPIES = 2
GIB = 2**30


@dataclass
class Estimate:
    weight_bytes: int
    activation_bytes: int  # the forward's peak of live activations at `batch`
    input_bytes: int
    batch: int

    @property
    def total(self) -> int:
        return (self.weight_bytes * WEIGHT_COPIES + self.activation_bytes * ACTIVATION_COPIES
                + self.input_bytes)

    def describe(self) -> str:
        return (f"{self.total / GIB:.2f} GiB ({WEIGHT_COPIES} copies of {self.weight_bytes / GIB:.2f} GiB of "
                f"weights, {ACTIVATION_COPIES} of {self.activation_bytes / GIB:.2f} GiB of activations at batch "
                f"{self.batch})")


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimate(model: nn.Module, shape: tuple[int, ...], dtype=torch.float32) -> Estimate | None:
    """The estimate at input `shape` (batch first), or None where the fake trace fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    seen = set()
    weights = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            weights += t.numel() * t.element_size()

    class Tally(TorchDispatchMode):
        live = peak = 0
        storages: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = id(storage) if not hasattr(storage, "_cdata") else storage._cdata
                    if key in Tally.storages:
                        continue  # a view of a tensor already counted
                    size = storage.nbytes()
                    Tally.storages[key] = size
                    Tally.live += size
                    Tally.peak = max(Tally.peak, Tally.live)
                    weakref.finalize(t, Tally._free, key)
            return out

        @staticmethod
        def _free(key):
            Tally.live -= Tally.storages.pop(key, 0)

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(shape, dtype=dtype)  # a fake tensor: no data allocated
            with torch.no_grad(), Tally():
                model(x)
    except Exception:  # noqa: BLE001 - see the module docstring: the real forward diagnoses
        return None
    numel = 1
    for d in shape:
        numel *= int(d)
    return Estimate(weights, Tally.peak, numel * torch.tensor([], dtype=dtype).element_size(), int(shape[0]))


def check(model: nn.Module, shape: tuple[int, ...], max_memory_gib: float | None) -> Estimate | None:
    """Refuse (OptionError) an estimate above the limit (module docstring)."""
    if max_memory_gib is not None and not max_memory_gib > 0:
        raise OptionError(f"--max-memory must be a positive number of GiB, not {max_memory_gib}")
    limit = max_memory_gib * GIB if max_memory_gib is not None else available_bytes()
    est = estimate(model, shape)
    if est is None or limit is None or est.total <= limit:
        return est
    where = (f"--max-memory {max_memory_gib:g} GiB" if max_memory_gib is not None else
             f"the {limit / GIB:.1f} GiB of memory available on this machine")
    raise OptionError(f"the export at input shape {'x'.join(map(str, shape))} needs an estimated {est.describe()}, "
                      f"more than {where}; raise --max-memory (GiB) if the estimate is too cautious")


def check_onnx_run(model_path, feeds: dict, max_memory_gib: float | None) -> int | None:
    """`run`: refuse (OptionError) when one inference of the ONNX model on `feeds` is
    estimated above the limit. Estimate: the initializers, the inputs and every intermediate
    tensor whose size ONNX shape inference finds at the feeds' shapes (an upper bound: ONNX
    Runtime reuses buffers; custom ops' outputs, which inference cannot size, are not
    counted). Returns the estimate in bytes (None where the model cannot be inferred)."""
    import numpy as np
    import onnx

    if max_memory_gib is not None and not max_memory_gib > 0:
        raise OptionError(f"--max-memory must be a positive number of GiB, not {max_memory_gib}")
    limit = max_memory_gib * GIB if max_memory_gib is not None else available_bytes()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
        for inp in model.graph.input:
            if inp.name in feeds:
                dims = inp.type.tensor_type.shape.dim
                for d, size in zip(dims, feeds[inp.name].shape):
                    d.ClearField("dim_param")
                    d.dim_value = int(size)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no estimate; ONNX Runtime reports what is wrong
        return None
    total = sum(int(np.prod(t.dims, dtype=object)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                for t in model.graph.initializer)
    total += sum(int(a.nbytes) for a in feeds.values())
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        shape = info.type.tensor_type.shape
        if not all(d.HasField("dim_value") for d in shape.dim):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).itemsize
        except Exception:  # noqa: BLE001 - an element type numpy lacks: not counted
            continue
        total += int(np.prod([d.dim_value for d in shape.dim], dtype=object)) * itemsize
    if limit is not None and total > limit:
        where = (f"--max-memory {max_memory_gib:g} GiB" if max_memory_gib is not None else
                 f"the {limit / GIB:.1f} GiB of memory available on this machine")
        raise OptionError(f"one run at these input shapes needs an estimated {total / GIB:.2f} GiB (weights, inputs "
                          f"and every intermediate tensor), more than {where}; raise --max-memory (GiB) if the "
                          "estimate is too cautious")
    return total

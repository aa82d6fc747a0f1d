"""Pass: give a compiled model a dynamic batch axis (`batch`) after it was folded at a fixed one.

Plan (issue 19): everything upstream is done at the captured batch N: `capture` traces the
model at `--input-shape`, `resolve_static_shapes` turns shape arithmetic into constants, the
fold and the lowering work on static shapes. Only at the end is the batch dimension relaxed:

Expects: an ONNX model with one or more graph inputs whose dimension 0 is N (the captured
batch), shapes inferable by onnx (custom-domain schemas registered, as `capture` does).
Guarantees: the same function, for every batch size B, of a model whose graph inputs and
outputs have dimension 0 `batch`:
  1. graph inputs get dimension 0 = `batch`;
  2. the shape-carrying constants that baked N in are rewritten, and only where the rewrite
     is exact for every B:
       - Reshape `shape` with shape[0] == N on a tensor whose dimension 0 is the batch ->
         shape[0] = 0 ("copy the input's dimension 0"; the node must not set allowzero=1);
       - Reshape `shape` with shape[0] == -1 whose other entries multiply to the input's
         per-sample size -> shape[0] = 0 (same value; lets shape inference keep the symbol);
       - Expand `shape` with shape[0] == N on a batch tensor -> shape[0] = 1 (broadcast keeps
         the input's dimension);
     a constant shared by several nodes is copied before the rewrite, so no other node sees
     it change;
  3. shapes are re-inferred after each round (a rewrite lets the symbol reach the next
     Reshape), at most `MAX_ROUNDS` rounds;
  4. every graph output must then have dimension 0 = `batch`. If one does not, nothing of
     the above is kept: `BatchAxisError` names the first node where the batch became fixed
     (e.g. a Resize with explicit `sizes`, a Slice over axis 0, a constant with N rows added
     to the batch) and the caller decides (export: keep the static batch and say so).
What this pass does not prove: numerical equality at B != N. The export verifies the relaxed
model against PyTorch at a second batch size for that (gate2deploy/cli/export.py).
Semantics that depend on the batch stay as PyTorch has them: PG's dynamic activation scale is
max|X| over the whole batch (the seed's rule), so outputs of a batch of B are compared with
PyTorch on the same batch of B, never sample by sample.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

BATCH = "batch"
MAX_ROUNDS = 16


class BatchAxisError(Exception):
    """The batch dimension cannot be relaxed exactly; the message names the node and why."""


def captured_batch(model: onnx.ModelProto) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value"):
        raise BatchAxisError(f"input {model.graph.input[0].name} has no static batch dimension")
    return int(dims[0].dim_value)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fresh shapes. Graph outputs are cleared too: inference merges into an output's existing
    shape, so a static dimension found in an earlier round would otherwise stay."""
    del model.graph.value_info[:]
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def _dim0(model: onnx.ModelProto) -> dict[str, onnx.TensorShapeProto.Dimension]:
    out = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and len(t.shape.dim):
            out[vi.name] = t.shape.dim[0]
    return out


def _dims(model: onnx.ModelProto, name: str) -> list | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return None


def _is_batch(dim) -> bool:
    return dim is not None and dim.dim_param == BATCH


def _set_dim0(vi: onnx.ValueInfoProto, value: str | int) -> None:
    dim = vi.type.tensor_type.shape.dim[0]
    if isinstance(value, str):
        dim.dim_param = value
    else:
        dim.dim_value = value


def _rewrite_constant(model: onnx.ModelProto, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    """Point input `index` of `node` at a new initializer holding `value` (never mutate a
    constant another node may read)."""
    name = f"{node.input[index]}__batch_{node.name or node.output[0]}"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.int64), name))
    node.input[index] = name


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _relax_round(model: onnx.ModelProto, n: int) -> bool:
    """One round of rule 2 on the currently inferred shapes; True if anything changed."""
    dim0 = _dim0(model)
    consts = _constants(model)
    changed = False
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Reshape", "Expand"):
            continue
        if not _is_batch(dim0.get(node.input[0])) or _is_batch(dim0.get(node.output[0])):
            continue
        shape = consts.get(node.input[1])
        if shape is None or shape.ndim != 1 or not len(shape):
            continue
        if node.op_type == "Expand":
            if shape[0] == n:
                new = shape.copy()
                new[0] = 1
                _rewrite_constant(model, node, 1, new)
                changed = True
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        rest = _dims(model, node.input[0])
        per_sample = int(np.prod(rest[1:])) if rest and all(d is not None for d in rest[1:]) else None
        if shape[0] == n or (shape[0] == -1 and per_sample is not None and len(shape) > 1
                             and (shape[1:] > 0).all() and int(np.prod(shape[1:])) == per_sample):
            new = shape.copy()
            new[0] = 0
            _rewrite_constant(model, node, 1, new)
            changed = True
    return changed


def _where_fixed(model: onnx.ModelProto) -> str:
    """The first node that reads a batch tensor and writes one whose dimension 0 is fixed."""
    dim0 = _dim0(model)
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(_is_batch(dim0.get(i)) for i in node.input) and any(
                o in dim0 and not _is_batch(dim0[o]) for o in node.output):
            return f"node {node.name or node.output[0]} ({node.op_type}) fixes it"
    return "no single node could be named"


def relax_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with a dynamic batch axis (contract above); BatchAxisError if that
    cannot be done exactly."""
    n = captured_batch(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.type.tensor_type.HasField("shape") and len(vi.type.tensor_type.shape.dim):
            _set_dim0(vi, BATCH)
    out = _infer(out)
    for _ in range(MAX_ROUNDS):
        if not _relax_round(out, n):
            break
        out = _infer(out)
    dim0 = _dim0(out)
    for o in out.graph.output:
        if not _is_batch(dim0.get(o.name)):
            raise BatchAxisError(f"output {o.name} keeps batch {n}: {_where_fixed(out)}")
    return out


def pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of a relaxed model with dimension 0 of its inputs set to `batch` and shapes
    re-inferred (for what needs static shapes, e.g. MAC counts of one batch)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.type.tensor_type.HasField("shape") and len(vi.type.tensor_type.shape.dim):
            _set_dim0(vi, batch)
    return _infer(out)

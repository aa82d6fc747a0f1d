"""The model's prunable edges and its layer table, the two things every profile is about.

An *edge* is one coupled channel group: channels that can only be removed together (the
compiler's channel analysis). For torchvision ResNets/VGGs and Gator-wrapped checkpoints the
edges are Gator's hyper-edges, in Gator's order (`importers.gator.hyper_edges`, 37 for
ResNet-50), so that a list of per-edge numbers can be handed to Gator's training by position.
Each hyper-edge is matched to exactly one channel group of the captured graph; a mismatch is
an error, never a guess. For other models the edges are the unpinned channel groups that some
Conv/Gemm produces, ordered by first appearance in the graph.

A *layer* is one Conv or Gemm node of the captured graph (BatchNorm is already folded into
its Conv by the capture). It records its geometry and which edges its input and output
channels belong to (`in_parts` / `out_parts`: runs of [edge index or None, feature count]; a
Concat input has several runs, None is a pinned run that never shrinks). From a channel count
per edge, `layer_shapes` gives every layer's pruned geometry: that is all the latency
predictor needs, and it equals what the fold produces for the same masks (tested).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from ..capture import capture
from ..errors import UserError
from ..passes import ir
from ..passes.channel_analysis import ChannelAnalysis, analyze
from ..passes.cleanup import cleanup
from ..passes.ir import const_value, shape_of

LAYER_OPS = ("Conv", "Gemm")


@dataclass
class Edge:
    index: int
    name: str
    channels: int
    producers: list[str] = field(default_factory=list)  # ONNX nodes whose output is this group
    modules: list[str] = field(default_factory=list)  # conv modules producing it (when known)


@dataclass
class Layer:
    name: str  # ONNX node name (the capture names it after the module path)
    op: str  # "Conv" or "Gemm"
    cin: int
    cout: int
    h: int  # input feature size (1 for Gemm)
    w: int
    kh: int
    kw: int
    stride: list[int]
    pads: list[int]
    dilation: list[int]
    groups: int
    depthwise: bool
    in_parts: list[list]  # [[edge index | None, features], ...]
    out_parts: list[list]
    out_h: int
    out_w: int


@dataclass
class ModelTable:
    batch: int
    input_shape: list[int]
    edges: list[Edge]
    layers: list[Layer]
    edge_source: str  # "gator hyper-edges" | "channel analysis"

    def full_channels(self) -> list[int]:
        return [e.channels for e in self.edges]

    def to_json(self) -> dict:
        return {"batch": self.batch, "input_shape": self.input_shape, "edge_source": self.edge_source,
                "edges": [asdict(e) for e in self.edges], "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> ModelTable:
        return cls(data["batch"], list(data["input_shape"]), [Edge(**e) for e in data["edges"]],
                   [Layer(**layer) for layer in data["layers"]], data["edge_source"])


@dataclass
class LayerShape:
    """A layer's geometry for one channel configuration."""

    layer: Layer
    cin: int
    cout: int
    groups: int

    @property
    def macs(self) -> int:
        lay = self.layer
        return self.layer_batch * self.cout * lay.out_h * lay.out_w * (self.cin // max(self.groups, 1)) * lay.kh * lay.kw

    layer_batch: int = 1


def layer_shapes(table: ModelTable, channels: list[int] | None = None) -> list[LayerShape]:
    """Every layer's (cin, cout, groups) when edge i keeps `channels[i]` channels."""
    channels = table.full_channels() if channels is None else list(channels)
    if len(channels) != len(table.edges):
        raise UserError(f"a channel configuration needs {len(table.edges)} counts (one per edge), got {len(channels)}")
    for edge, c in zip(table.edges, channels):
        if not 1 <= int(c) <= edge.channels:
            raise UserError(f"edge {edge.index} ({edge.name}) keeps {c} channels; it has 1..{edge.channels}")
    out = []
    for lay in table.layers:
        cin = _count(lay.in_parts, table.edges, channels)
        cout = _count(lay.out_parts, table.edges, channels)
        groups = cin if lay.depthwise else lay.groups
        out.append(LayerShape(lay, cin, cout, groups, table.batch))
    return out


def _count(parts: list[list], edges: list[Edge], channels: list[int]) -> int:
    total = 0
    for edge, features in parts:
        if edge is None:
            total += features
        else:
            per_channel = features // edges[edge].channels  # >1 after a channel-major Flatten
            total += per_channel * int(channels[edge])
    return total


def total_macs(table: ModelTable, channels: list[int] | None = None) -> int:
    return sum(s.macs for s in layer_shapes(table, channels))


# ---------------------------------------------------------------------------------------
# Building the table
# ---------------------------------------------------------------------------------------
def build_table(model: nn.Module, example: torch.Tensor, edges: str = "auto",
                no_last_conv: bool = False) -> tuple[ModelTable, onnx.ModelProto]:
    """Capture `model` and return its layer table and the captured (unpruned) ONNX model.

    edges: "auto" (Gator's hyper-edges for ResNets and VGG-style `features` chains, else
    channel groups), "gator" (required; Gator's naive sequential order for other models),
    "groups" (channel groups only). no_last_conv: Gator's option of that name (the last edge
    is then not prunable and gets no multiplier).
    """
    model = model.eval()
    proto = capture(model, example)
    trace_order = [n.name for n in proto.graph.node if n.op_type in LAYER_OPS]
    graph = cleanup(ir.import_graph(proto))
    ana = analyze(graph)
    layer_nodes = [n for n in graph.nodes if n.op in LAYER_OPS]
    groups = _ChannelGroups(ana, layer_nodes)

    gator_edges = None
    if edges in ("auto", "gator"):
        gator_edges = _gator_hyper_edges(model, required=edges == "gator", no_last_conv=no_last_conv)
    if gator_edges is not None:
        node_of_module, conv_of_bn = _module_maps(model, example, trace_order)
        root_order, names, modules = _match_gator_edges(gator_edges, groups, graph, node_of_module, conv_of_bn)
        source = "gator hyper-edges"
    else:
        root_order = []
        for node in layer_nodes:
            for tensor in (node.outputs[0], node.inputs[0]):
                for key, _length in groups.runs(tensor.name):
                    if key is not None and not groups.pinned(key) and key not in root_order:
                        root_order.append(key)
        names = [f"group{i}" for i in range(len(root_order))]
        modules = [[] for _ in root_order]
        source = "channel analysis"
    index_of_root = {r: i for i, r in enumerate(root_order)}

    layers = [_layer(node, groups, index_of_root) for node in layer_nodes]
    channel_count = {i: 0 for i in range(len(root_order))}
    producers: dict[int, list[str]] = {i: [] for i in range(len(root_order))}
    for lay in layers:
        for edge, features in lay.out_parts:
            if edge is not None and not lay.depthwise:
                producers[edge].append(lay.name)
                channel_count[edge] = max(channel_count[edge], features)
    for lay in layers:  # an edge only read (never produced by a layer) still has a size
        for edge, features in lay.in_parts:
            if edge is not None and channel_count[edge] == 0:
                channel_count[edge] = features
    edge_list = [Edge(i, names[i], channel_count[i], producers[i], modules[i]) for i in range(len(root_order))]
    shape = list(example.shape)
    table = ModelTable(shape[0], shape, edge_list, layers, source)
    return table, proto


class _ChannelGroups:
    """Whole coupled groups from the analysis' per-channel identities.

    The analysis unions channel ids position by position (channel c of a residual branch
    with channel c of the shortcut), so one union-find root is one channel. A group is the
    block of channels one layer creates; blocks whose channels were unioned are one group,
    keyed by the smallest root among them.
    """

    def __init__(self, ana: ChannelAnalysis, layer_nodes):
        self.ana = ana
        key_of_root: dict[int, int] = {}
        parent: dict[int, int] = {}

        def find(k: int) -> int:
            while parent[k] != k:
                k = parent[k]
            return k

        for node in layer_nodes:
            out = node.outputs[0].name
            if out not in ana.maps or (node.op == "Conv" and int(node.attrs.get("group", 1)) > 1):
                continue  # a depthwise conv carries its input's group
            roots = ana.roots_of(out).tolist()
            key = min(roots)
            parent.setdefault(key, key)
            for r in roots:
                other = key_of_root.setdefault(r, key)
                a, b = find(other), find(key)
                if a != b:  # blocks coupled only in part: one group
                    parent[max(a, b)] = min(a, b)
        self.key_of_root = {r: find(k) for r, k in key_of_root.items()}
        self.pinned_keys = {self.key_of_root[r] for r in ana.pinned_roots() if r in self.key_of_root}

    def pinned(self, key: int) -> bool:
        return key in self.pinned_keys

    def keys(self, tensor: str) -> set[int]:
        return {k for k, _ in self.runs(tensor) if k is not None}

    def runs(self, tensor: str) -> list[tuple[int | None, int]]:
        """Consecutive runs of one group along a tensor's channels: [(key or None, length)]."""
        if tensor not in self.ana.maps:
            return []
        runs: list[tuple[int | None, int]] = []
        for r in self.ana.roots_of(tensor).tolist():
            k = self.key_of_root.get(r)
            if runs and runs[-1][0] == k:
                runs[-1] = (k, runs[-1][1] + 1)
            else:
                runs.append((k, 1))
        return runs


def _parts(groups: _ChannelGroups, tensor: str, size: int, index_of_root: dict[int, int]) -> list[list]:
    runs = groups.runs(tensor)
    if not runs:
        return [[None, size]]
    parts: list[list] = []
    for key, length in runs:
        edge = index_of_root.get(key)
        if parts and parts[-1][0] == edge:
            parts[-1][1] += length
        else:
            parts.append([edge, length])
    return parts


def _layer(node, channel_groups: _ChannelGroups, index_of_root: dict[int, int]) -> Layer:
    weight = const_value(node.inputs[1])
    if weight is None:
        raise UserError(f"layer {node.name} has computed weights; the profiler needs constant weights")
    x, y = node.inputs[0], node.outputs[0]
    if node.op == "Conv":
        ishape, oshape = shape_of(x), shape_of(y)
        if ishape is None or oshape is None or len(ishape) != 4:
            raise UserError(f"Conv {node.name}: only 2-D convolutions with static shapes are profiled")
        groups = int(node.attrs.get("group", 1))
        cout, cin = int(weight.shape[0]), int(weight.shape[1]) * groups
        kh, kw = int(weight.shape[2]), int(weight.shape[3])
        stride = [int(s) for s in node.attrs.get("strides", [1, 1])]
        pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
        dilation = [int(d) for d in node.attrs.get("dilations", [1, 1])]
        depthwise = groups > 1 and groups == cin == cout
        h, w, out_h, out_w = ishape[2], ishape[3], oshape[2], oshape[3]
    else:  # Gemm
        trans_b = int(node.attrs.get("transB", 0))
        cin, cout = (int(weight.shape[1]), int(weight.shape[0])) if trans_b else (int(weight.shape[0]), int(weight.shape[1]))
        groups, kh, kw, h, w, out_h, out_w = 1, 1, 1, 1, 1, 1, 1
        stride, pads, dilation, depthwise = [1, 1], [0, 0, 0, 0], [1, 1], False
    in_parts = _parts(channel_groups, x.name, cin, index_of_root)
    out_parts = _parts(channel_groups, y.name, cout, index_of_root)
    return Layer(node.name, node.op, cin, cout, h, w, kh, kw, stride, pads, dilation, groups, depthwise,
                 in_parts, out_parts, out_h, out_w)


# ---------------------------------------------------------------------------------------
# Gator's hyper-edges: matched to channel groups through the modules they name
# ---------------------------------------------------------------------------------------
def _gator_hyper_edges(model: nn.Module, required: bool, no_last_conv: bool = False):
    try:
        from ..importers import gator
    except ImportError:
        if required:
            raise UserError("Gator hyper-edges need gate2deploy.importers.gator, which is not installed") from None
        return None
    if not required and not (gator.is_resnet(model) or _vgg_chain(model)):
        return None  # "auto": Gator's naive order only where the convs form a chain (VGGs)
    try:
        edges = gator.hyper_edges(model, no_last_conv)
    except UserError:
        if required:
            raise
        return None
    if not edges and required:
        raise UserError(f"Gator's hyper-edge map finds no edges in {type(model).__name__}")
    return edges or None


def _vgg_chain(model: nn.Module) -> bool:
    """Every conv is a direct child of a `features` Sequential: a chain, VGG-style."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        return False
    direct = {id(m) for m in features.children()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and all(id(m) in direct for m in convs)


def _module_maps(model: nn.Module, example: torch.Tensor, trace_order: list[str]):
    """ONNX layer node name per module path, and the conv feeding each BatchNorm.

    The capture traces modules in call order, so the i-th Conv/Gemm node of the captured
    graph is the i-th Conv/Linear call; shapes are checked to make sure.
    """
    calls: list[tuple[str, nn.Module]] = []
    producer_of_tensor: dict[int, str] = {}
    conv_of_bn: dict[str, str] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def after(m, i, o, name=name):
                calls.append((name, m))
                producer_of_tensor[id(o)] = name
            handles.append(mod.register_forward_hook(after))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            def before(m, i, name=name):
                if id(i[0]) in producer_of_tensor:
                    conv_of_bn[name] = producer_of_tensor[id(i[0])]
            handles.append(mod.register_forward_pre_hook(before))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(trace_order):
        raise UserError(f"cannot match the model's {len(calls)} conv/linear calls to the {len(trace_order)} "
                        "Conv/Gemm nodes of its capture")
    node_of_module: dict[str, str] = {}
    for (name, _mod), node in zip(calls, trace_order):
        node_of_module.setdefault(name, node)
    return node_of_module, conv_of_bn


def _match_gator_edges(hyper, groups: _ChannelGroups, graph, node_of_module, conv_of_bn):
    nodes = {n.name: n for n in graph.nodes}
    roots, names, modules = [], [], []
    for i, edge in enumerate(hyper):
        found: set[int] = set()
        producers: list[str] = []
        for module in edge.in_modules:
            node = nodes.get(node_of_module.get(module, ""))
            if node is None or not groups.keys(node.inputs[0].name):
                raise UserError(f"Gator hyper-edge {i} ({edge.name}): input of {module} not found in the capture")
            found.update(groups.keys(node.inputs[0].name))
        for module in edge.out_modules:
            conv = conv_of_bn.get(module, module)
            producers.append(conv)
            node = nodes.get(node_of_module.get(conv, ""))
            if node is None:
                raise UserError(f"Gator hyper-edge {i} ({edge.name}): output of {module} not found in the capture")
            found.update(groups.keys(node.outputs[0].name))
        if len(found) != 1:
            raise UserError(f"Gator hyper-edge {i} ({edge.name}) spans {len(found)} channel groups of the "
                            "captured graph, not one: the hyper-edge map does not fit this model")
        root = found.pop()
        if root in roots:
            raise UserError(f"Gator hyper-edges {roots.index(root)} and {i} are the same channel group")
        if groups.pinned(root):
            raise UserError(f"Gator hyper-edge {i} ({edge.name}) is a pinned channel group (graph input/output "
                            "or an op without a channel rule)")
        roots.append(root)
        names.append(edge.name)
        modules.append(producers)
    return roots, names, modules


def random_configuration(table: ModelTable, rng: np.random.Generator, low: float = 0.3) -> list[int]:
    """A random pruned configuration: each edge keeps a uniform fraction in [low, 1]."""
    return [max(1, int(round(e.channels * rng.uniform(low, 1.0)))) for e in table.edges]

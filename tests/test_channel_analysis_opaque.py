"""Channel analysis never crashes: what it cannot reason about pins the channels around it
(nothing folds across it) and is named, with the reason, in the fold result and the export
report (`fold.pinned_ops`).

Reproduces issue 12 point 5: a seed-style PACT activation (an autograd.Function clamping to
a learned upper bound, dnn-gating/utils/pg_utils.py PactClip/PactReLU) exported as an op
whose output shape shape inference cannot give took the whole export down with
`AttributeError: 'NoneType' object has no attribute 'known'`.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fold_helpers import max_rel_err
from gate2deploy.capture import capture
from gate2deploy.nn import ChannelMask
from gate2deploy.passes import channel_analysis, ir
from gate2deploy.passes.fold_masks import FoldResult, fold_static_masks

MASK = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])


class PactClip(torch.autograd.Function):
    """The seed's PACT clip (dnn-gating/utils/pg_utils.py, PactClip.forward):
    y = clamp(x, 0, upper_bound), the upper bound a learned scalar."""

    @staticmethod
    def forward(ctx, x, upper_bound):
        return torch.clamp(x, 0, upper_bound.data)


class Pact(nn.Module):
    def __init__(self):
        super().__init__()
        self.upper_bound = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return PactClip.apply(x, self.upper_bound)


class MaskedPactNet(nn.Module):
    """conv -> mask -> PACT -> conv: the masked channels are zero after PACT (clamp(0) = 0)."""

    def __init__(self, act=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.mask = ChannelMask(MASK)
        self.act = act if act is not None else Pact()
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.mask(self.conv1(x))))


def _with_opaque_activation(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The captured graph with its Clip turned into a custom-domain op that shape inference
    knows nothing about (what an autograd.Function exported with its own `symbolic` gives):
    its output and everything after it lose their static shapes."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    clip = next(n for n in proto.graph.node if n.op_type == "Clip")
    clip.op_type, clip.domain = "PactClip", "acme"
    proto.opset_import.append(onnx.helper.make_opsetid("acme", 1))
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto)


def _conv_rows(graph, index):
    convs = [n for n in graph.nodes if n.op == "Conv"]
    return ir.const_value(convs[index].inputs[1]).shape


def test_op_without_static_shape_pins_and_is_named():
    captured = capture(MaskedPactNet(), torch.randn(1, 3, 8, 8))
    graph = ir.import_graph(_with_opaque_activation(captured))
    result = FoldResult()
    graph = fold_static_masks(graph, policy="keep", result=result)  # crashed before
    (opaque,) = result.pinned_ops
    assert opaque.op == "acme::PactClip" and "no static shape" in opaque.reason
    # Pinned: the masked channels stay (conv1 keeps its 6 rows), the mask is kept exactly.
    assert _conv_rows(graph, 0)[0] == 6
    assert result.unfoldable and "acme::PactClip" in result.unfoldable[0].reason


def test_a_failing_rule_pins_instead_of_crashing(monkeypatch):
    def broken(ana, node):
        ana.bindings.append("half-done")  # undone when the rule fails
        raise IndexError("unforeseen form")

    monkeypatch.setitem(channel_analysis.RULES, "Clip", broken)
    captured = capture(MaskedPactNet(), torch.randn(1, 3, 8, 8))
    graph = ir.import_graph(captured)
    ana = channel_analysis.analyze(graph)
    assert "half-done" not in ana.bindings
    (opaque,) = ana.opaque
    assert opaque.op == "Clip" and "IndexError: unforeseen form" in opaque.reason
    clip = next(n for n in graph.nodes if n.op == "Clip")
    pinned = ana.pinned_roots()
    assert all(r in pinned for r in ana.roots_of(clip.inputs[0].name).tolist())


def test_seed_pact_folds_exactly_when_traced_into_standard_ops():
    # Without `symbolic`, the exporter traces PactClip's forward into a Clip whose upper
    # bound is a constant: the analysis knows Clip, masked channels fold away.
    torch.manual_seed(0)
    model = MaskedPactNet().eval()
    captured = capture(model, torch.randn(1, 3, 8, 8))
    graph = ir.import_graph(captured)
    result = FoldResult()
    folded = ir.export_model(fold_static_masks(graph, policy="error", result=result))
    assert not result.pinned_ops
    assert _conv_rows(ir.import_graph(folded), 0)[0] == int(MASK.sum())
    assert max_rel_err(model, folded, (1, 3, 8, 8)) <= 1e-5


class ChannelCumSum(nn.Module):
    """A standard op the analysis has no rule for, mixing channels (a running sum)."""

    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_export_report_names_the_pinned_op(tmp_path, cli):
    (tmp_path / "net.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_channel_analysis_opaque import MaskedPactNet, ChannelCumSum\n"
        "def build():\n    return MaskedPactNet(ChannelCumSum())\n" % str(__import__("pathlib").Path(__file__).parent))
    torch.save(MaskedPactNet(ChannelCumSum()).state_dict(), tmp_path / "c.pt")
    args = ["export", tmp_path / "c.pt", "--model", f"{tmp_path / 'net.py'}:build", "--input-shape", "1,3,8,8",
            "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json"]
    code, _, err = cli(*args)
    assert code == 2 and "CumSum" in err and "no channel rule" in err, err  # the mask cannot fold across it
    code, stdout, err = cli(*args, "--keep-unfoldable")
    assert code == 0, err
    pinned = json.loads((tmp_path / "r.json").read_text())["fold"]["pinned_ops"]
    assert [p["op"] for p in pinned] == ["CumSum"] and "no channel rule" in pinned[0]["reason"]
    assert "channels kept around 1 CumSum node" in stdout
    # Exact: the running sum over channels sees the masked (zero) channels as zeros.
    model = MaskedPactNet(ChannelCumSum()).eval()
    model.load_state_dict(torch.load(tmp_path / "c.pt"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


class PactWithSymbolic(PactClip):
    @staticmethod
    def symbolic(g, x, upper_bound):
        return g.op("acme::PactClip", x, upper_bound)


class SymbolicPact(Pact):
    def forward(self, x):
        return PactWithSymbolic.apply(x, self.upper_bound)


def test_foreign_op_is_refused_by_name_at_capture(tmp_path, cli):
    from gate2deploy.errors import UserError
    with pytest.raises(UserError, match=r"acme::PactClip.*no gate2deploy target runs"):
        capture(MaskedPactNet(SymbolicPact()), torch.randn(1, 3, 8, 8))

"""The Python front door (gate2deploy.compile / info), the pass manager and the targets:
what a notebook user does, checked against PyTorch computed here."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import gate2deploy
from gate2deploy.errors import OptionError, TargetUnavailableError, UserError
from gate2deploy.nn import ChannelMask
from gate2deploy.pipeline import GraphPass, PassContext, PassFailure, PassManager, PIPELINES


def _masked_net():
    torch.manual_seed(0)
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1])
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), ChannelMask(keep),
                        nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net[1].running_mean.normal_()
    return net.eval(), keep


def test_compile_a_module_in_python():
    net, keep = _masked_net()
    x = torch.randn(2, 3, 16, 16)
    compiled = gate2deploy.compile(net, x, target="ort", physical_widths="exact")
    convs = [n for n in compiled.onnx_model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in compiled.onnx_model.graph.initializer}
    assert onnx.numpy_helper.to_array(inits[convs[0].input[1]]).shape[0] == int(keep.sum())  # really smaller
    with torch.no_grad():
        expected = net(x).numpy()
    got = compiled.run(x)[0]
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert compiled.report["target"] == "ort" and compiled.report["macs_after"] < compiled.report["macs_before"]
    assert set(compiled.report["pass_seconds"]) == {p.name for p in PIPELINES["ort"]} | {"dynamic_batch"}
    assert compiled.report["batch"]["axis"] == "dynamic" and compiled.report["batch"]["verified"] == [2, 3]


def test_compile_a_checkpoint_with_cli_options_and_save(tmp_path):
    from models.cifar_nets import randomize_batchnorm, resnet20
    model = randomize_batchnorm(resnet20(), seed=3)
    ckpt = tmp_path / "r20.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    from pathlib import Path
    spec = f"{Path(__file__).parent / 'models' / 'cifar_nets.py'}:resnet20"
    compiled = gate2deploy.compile(ckpt, input_shape="1,3,32,32", model=spec, netslim_density=0.5, target="onnx")
    out = compiled.save(tmp_path / "r20.onnx")
    x = torch.randn(1, 3, 32, 32)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], compiled.run(x)[0])
    assert compiled.report["mask_sources"]["netslim"]["density"] == 0.5
    json.dumps(compiled.report)  # the same JSON-able dict the CLI writes with --report


def test_info_in_python_counts_effective_macs():
    net, keep = _masked_net()
    info = gate2deploy.info(net, torch.randn(1, 3, 16, 16), physical_widths="exact")
    second = next(row for row in info["layers"] if row["in_before"] == 8)
    assert second["in_after"] == int(keep.sum())
    assert info["effective"]["macs"] < info["dense"]["macs"]


def test_info_keeps_gated_layers_as_layers():
    """A dynamic gate has no static mask to fold: info must report each gated layer with its
    full channels and MACs (the effective model is the fold's, not a lowering of the gates,
    which used to show every FBSConv as removed, 3>0, and more effective MACs than dense).
    Expected counts from the layer shapes here: conv MACs = O * C/g * kh * kw * Ho * Wo."""
    from gate2deploy.gated import FBSConv2d
    torch.manual_seed(0)
    net = nn.Sequential(FBSConv2d(3, 8, 3, padding=1, density=0.5), FBSConv2d(8, 6, 3, stride=2, padding=1,
                                                                                 density=0.5)).eval()
    info = gate2deploy.info(net, torch.randn(1, 3, 8, 8))
    rows = [r for r in info["layers"] if r["op"] == "FBSConv"]
    assert [(r["in_before"], r["in_after"], r["out_before"], r["out_after"]) for r in rows] == \
        [(3, 3, 8, 8), (8, 8, 6, 6)]
    assert [r["macs_after"] for r in rows] == [8 * 3 * 9 * 8 * 8, 6 * 8 * 9 * 4 * 4]
    assert info["effective"]["macs"] <= info["dense"]["macs"]


def test_unknown_option_and_bad_target_are_typed_errors():
    net, _ = _masked_net()
    with pytest.raises(OptionError, match="unknown option 'netslim_densty'"):
        gate2deploy.compile(net, torch.randn(1, 3, 8, 8), netslim_densty=0.5)
    with pytest.raises(OptionError, match="unknown target"):
        gate2deploy.compile(net, torch.randn(1, 3, 8, 8), target="tensorflow")
    assert issubclass(OptionError, UserError) and TargetUnavailableError.exit_code == 3


def test_pass_manager_names_the_failing_pass_and_checks_preconditions(tmp_path):
    net, _ = _masked_net()
    from gate2deploy.capture import capture
    proto = capture(net, torch.randn(1, 3, 8, 8))

    def broken(graph, ctx):
        raise IndexError("boom")
    with pytest.raises(PassFailure, match="pass broken_pass failed: IndexError: boom"):
        PassManager(PIPELINES["onnx"][:1] + [GraphPass("broken_pass", broken)]).run(proto, PassContext())
    with pytest.raises(PassFailure, match="pass canonicalize_channel_shuffle requires resolve_static_shapes"):
        PassManager([p for p in PIPELINES["onnx"] if p.name != "resolve_static_shapes"])

    def corrupt(graph, ctx):  # a pass that leaves a node reading a tensor nobody produces
        graph.nodes[0].op = "NoSuchOp"
        return graph
    ctx = PassContext(debug_dir=str(tmp_path / "dbg"))
    with pytest.raises(PassFailure, match="graph invalid after pass corrupt"):
        PassManager(PIPELINES["onnx"][:2] + [GraphPass("corrupt", corrupt)]).run(proto, ctx)
    assert sorted(p.name for p in (tmp_path / "dbg").iterdir()) == ["00_cleanup.onnx", "01_resolve_static_shapes.onnx"]


def test_debug_passes_flag_dumps_every_pass(tmp_path, cli):
    from models.cifar_nets import vgg16_bn
    model = vgg16_bn(width=0.125)
    ckpt = tmp_path / "v.pt"
    torch.save(model.state_dict(), ckpt)
    from pathlib import Path
    spec = f"{Path(__file__).parent / 'models' / 'cifar_nets.py'}:vgg16_bn"
    code, _, err = cli("export", ckpt, "--model", spec, "--model-kwargs", '{"width": 0.125}', "--input-shape",
                       "1,3,32,32", "-o", tmp_path / "v.onnx", "--debug-passes", tmp_path / "dbg",
                       "--netslim-density", "0.5")
    assert code == 0, err
    assert len(list((tmp_path / "dbg").iterdir())) == len(PIPELINES["onnx"])


def test_python_api_checks_options_before_any_work(tmp_path):
    """gate2deploy.compile checks its options before it loads or traces anything (as the CLI
    does): a --debug-passes path that is a file, or a bad --gated-kernels, is reported even for a
    checkpoint that does not exist (checked first, these would be a missing file instead)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    missing = tmp_path / "missing.pt"
    with pytest.raises(OptionError, match="--debug-passes"):
        gate2deploy.compile(str(missing), (1, 3, 8, 8), debug_passes=str(blocker))
    with pytest.raises(OptionError, match="--gated-kernels"):
        gate2deploy.compile(str(missing), (1, 3, 8, 8), gated_kernels="fastest")
    with pytest.raises(OptionError, match="--kernel-threads"):
        gate2deploy.compile(str(missing), (1, 3, 8, 8), kernel_threads=0)
    with pytest.raises(OptionError, match="--stream-convs"):
        gate2deploy.compile(str(missing), (1, 3, 8, 8), stream_convs="always")


def test_profile_old_target_names_are_aliases():
    from gate2deploy.targets import get_target
    assert get_target("ort-cpu").name == "ort" and get_target("tensorrt").name == "trt"
    from gate2deploy.profiling.lut import _on_ort_cpu
    assert _on_ort_cpu({"target": "ort-cpu"}) and _on_ort_cpu({"target": "ort"})


def test_dense_macs_count_layers_after_a_shape_losing_shortcut():
    """The option-A shortcut of dnn-gating's CIFAR ResNet-20 (LambdaLayer: strided slice and
    F.pad of zero channels) stops ONNX shape inference; the layers after it still count."""
    from models.seed_layers import resnet20_cg
    net = resnet20_cg(partitions=4, shuffle=False, ginit=0.0, use_group=False, sparse_bp=False, alpha=2.0).eval()
    x = torch.randn(1, 3, 32, 32)
    expected, outs = 0, {}  # counted from PyTorch, independently of the report
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o.shape))
             for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    net(x)
    for h in hooks:
        h.remove()
    for n, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            expected += int(np.prod(outs[n])) * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            expected += int(np.prod(outs[n])) * m.in_features
    info = gate2deploy.info(net, x)
    assert info["dense"]["macs"] == expected

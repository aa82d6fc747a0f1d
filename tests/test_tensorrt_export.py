"""`export --target trt` and `build-engine` on a machine without TensorRT (exit code 3 with
everything prepared), the plugin declaration against the exported nodes and the op schemas,
and the dynamic batch axis of every target (export at batch 1, run at batch 8 against
PyTorch at batch 8).

Expected values come from PyTorch (the model itself, at the batch that is run) and from the
ONNX op schemas of gate2deploy/ops.py (the op catalog) (a declaration separate from the plugins'). PG's
activation scale is max|X| over the whole batch (dnn-gating's PGConv2d, pg_ops.py: the
quantizer's scale is taken over the input tensor), so a batch of 8 is compared with PyTorch on
the same batch of 8. Tests that need TensorRT and a GPU are marked `tensorrt` and skip with
the reason where either is missing.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gate2deploy.runtimes import tensorrt_available

TINY = str(Path(__file__).parent / "models" / "gated_tiny.py") + ":gated_tiny"
NO_TENSORRT = tensorrt_available()
needs_no_tensorrt = pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT and a GPU are present here")
needs_tensorrt = pytest.mark.skipif(NO_TENSORRT is not None, reason=f"needs TensorRT and a GPU: {NO_TENSORRT}")


def tiny_model() -> torch.nn.Module:
    from models.gated_tiny import gated_tiny

    torch.manual_seed(0)
    model = gated_tiny().eval()
    with torch.no_grad():  # BN statistics away from the identity, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        # PG thresholds off the MSB sums' few exact values (a threshold of 0 sits on every
        # all-zero window after a ReLU: ties by construction, not by rounding)
        model.pg.threshold.uniform_(0.05, 0.15)
    return model


def run_cli(*args) -> tuple[int, str, str]:
    from gate2deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(tiny_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trt_export(tiny_ckpt, tmp_path_factory):
    """One `export --target trt` at batch 1 (profile 1,4,16) shared by the tests below."""
    out = tmp_path_factory.mktemp("trt")
    code, stdout, stderr = run_cli("export", tiny_ckpt, "--model", TINY, "--input-shape", "1,3,8,8",
                                   "--target", "trt", "-o", out / "model.engine", "--batch", "1,4,16",
                                   "--physical-widths", "exact", "--report", out / "report.json")
    return out, code, stdout, stderr


def check_against_torch(model_proto: onnx.ModelProto, batch: int):
    """check_export of an exported model at `batch` against the tiny PyTorch model at `batch`."""
    from gate2deploy.capture import capture
    from gate2deploy.verify import check_export, random_inputs

    model = tiny_model()
    captured = capture(model, torch.randn(1, 3, 8, 8))  # names the gated nodes for the layer check
    shape = (batch, 3, 8, 8)
    return check_export(model, captured, model_proto, shape, 1e-4, random_inputs(shape, 2, seed=batch))


def batch_dim(value_info) -> str | int:
    d = value_info.type.tensor_type.shape.dim[0]
    return d.dim_param or d.dim_value


# ------------------------------------------------------------------------------------------
# --target trt without TensorRT
# ------------------------------------------------------------------------------------------
@needs_no_tensorrt
def test_trt_export_without_tensorrt_writes_onnx_and_json_and_exits_3(trt_export):
    out, code, stdout, stderr = trt_export
    assert code == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    onnx_path, json_path, engine = out / "model.trt.onnx", out / "model.trt.json", out / "model.engine"
    # what is missing, and the exact command for the GPU host
    assert "TensorRT" in lines[0]
    assert f"gate2deploy build-engine {onnx_path} -o {engine}" in lines[0]
    assert onnx_path.is_file() and json_path.is_file() and not engine.exists()
    cfg = json.loads(json_path.read_text())
    assert cfg["onnx"] == "model.trt.onnx" and cfg["engine"] == "model.engine"
    assert cfg["precision"] == "fp32" and cfg["batch_axis"] == "dynamic"
    assert cfg["inputs"] == {"input": {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [16, 3, 8, 8]}}
    assert cfg["plugins"]["ops"] == ["CGConv", "FBSConv", "PGConv"]
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt"]["engine"] is None and "TensorRT" in report["tensorrt"]["not_built"]
    assert report["batch"]["axis"] == "dynamic" and report["batch"]["verified"] == [1, 2]
    assert "verified vs PyTorch" in stdout


@needs_no_tensorrt
def test_build_engine_without_tensorrt_exits_3_after_checking_its_input(trt_export, tmp_path):
    out, *_ = trt_export
    code, _, err = run_cli("build-engine", out / "model.trt.onnx", "--fp16")
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert f"gate2deploy build-engine {out / 'model.trt.onnx'} -o {out / 'model.engine'} --fp16" in err
    assert not (out / "model.engine").exists()
    # bad input is still exit 2, decided before TensorRT is looked for
    code, _, err = run_cli("build-engine", out / "model.trt.onnx", "--batch", "8,4,1")
    assert code == 2 and "--batch" in err
    lonely = tmp_path / "lonely.trt.onnx"
    lonely.write_bytes((out / "model.trt.onnx").read_bytes())
    code, _, err = run_cli("build-engine", lonely)
    assert code == 2 and "lonely.trt.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value, words", [
    ("engine", "../../elsewhere.engine", ["engine", "not a file name"]),
    ("engine", 5, ["engine"]),
    ("rtol", "abc", ["rtol"]),
    ("plugins", "x", ["plugins"]),
    ("inputs", None, ["shapes"]),
])
def test_build_engine_with_a_damaged_config_is_one_line(trt_export, tmp_path, field, value, words):
    """model.trt.json edited by hand: one line naming the field, before TensorRT is looked
    for (these were KeyError / TypeError / ValueError tracebacks, and an engine name with
    `..` would have been written outside the folder)."""
    out, *_ = trt_export
    cfg = json.loads((out / "model.trt.json").read_text())
    if field == "inputs":
        cfg["inputs"] = {name: 3 for name in cfg["inputs"]}
    else:
        cfg[field] = value
    (tmp_path / "m.trt.onnx").write_bytes((out / "model.trt.onnx").read_bytes())
    (tmp_path / "m.trt.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("build-engine", tmp_path / "m.trt.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_trt_onnx_plugin_nodes_match_the_plugin_declaration(trt_export):
    """Every gated node of model.trt.onnx is what runtimes/tensorrt_plugins.py registers: op,
    namespace, version, inputs, attributes and their ONNX types; and the declaration agrees
    with the op schemas (OPS.md's ops less the CPU-only epilogue)."""
    from gate2deploy import ops as opdefs
    from gate2deploy.runtimes import tensorrt_plugins as tp

    out, *_ = trt_export
    model = onnx.load(str(out / "model.trt.onnx"))
    kinds = {"ints": onnx.AttributeProto.INTS, "int": onnx.AttributeProto.INT,
             "float": onnx.AttributeProto.FLOAT, "string": onnx.AttributeProto.STRING}
    seen = set()
    for node in (n for n in model.graph.node if n.domain == "gate2deploy"):
        spec = tp.PLUGINS[node.op_type]
        seen.add(node.op_type)
        attrs = {a.name: a for a in node.attribute}
        assert attrs.pop("plugin_namespace").s.decode() == tp.NAMESPACE
        assert attrs.pop("plugin_version").s.decode() == tp.VERSION
        assert {name: a.type for name, a in attrs.items()} == {n: kinds[k] for n, k, _ in spec.attributes}
        assert len(node.input) == len(spec.inputs)
    assert seen == set(tp.PLUGINS)

    opdefs.register_all()
    epilogue = {*opdefs.EPILOGUE_INPUTS, *opdefs.EPILOGUE_ATTRIBUTES}
    schema_types = {onnx.defs.OpSchema.AttrType.INTS: "ints", onnx.defs.OpSchema.AttrType.INT: "int",
                    onnx.defs.OpSchema.AttrType.FLOAT: "float", onnx.defs.OpSchema.AttrType.STRING: "string"}
    sentinel = {k: k for k in ("desc", "tensor", "ints", "int", "float", "string", "outputs", "stream", "return")}
    for op, spec in tp.PLUGINS.items():
        schema = onnx.defs.get_schema(op, max_inclusive_version=1, domain="gate2deploy")
        assert [i.name for i in schema.inputs if i.name not in epilogue] == list(spec.inputs)
        # CGConv / FBSConv take `group` only as 1 (OPS.md): their plugins leave it out.
        # FBSConv's `activation` is its own (a plugin field), not CG/PG's CPU-only epilogue;
        # its fixed `threshold` is refused by name (tensorrt_plugins.py); the layout attributes
        # exist in ONNX Runtime sessions only (runtimes/ort_layout.py), never in an export.
        left_out = ({"group", "threshold", *opdefs.LAYOUT_ATTRIBUTES} if op == "FBSConv"
                    else epilogue | ({"group"} if op == "CGConv" else set()))
        assert {n: schema_types[a.type] for n, a in schema.attributes.items() if n not in left_out} == \
            {n: k for n, k, _ in spec.attributes}
        # the signature tensorrt.plugin reads: tensors, then attributes with their types
        impl = tp.plugin_signature(spec, "impl", sentinel)
        assert list(impl.parameters) == [*spec.inputs, *(n for n, _, _ in spec.attributes), "outputs", "stream"]
        assert [p.annotation for p in impl.parameters.values()][len(spec.inputs):-2] == \
            [k for _, k, _ in spec.attributes]

    cfg = json.loads((out / "model.trt.json").read_text())
    module = __import__(cfg["plugins"]["registration_module"], fromlist=["_"])
    assert callable(getattr(module, cfg["plugins"]["register_function"]))
    assert (cfg["plugins"]["namespace"], cfg["plugins"]["version"]) == (tp.NAMESPACE, tp.VERSION)


def test_plugin_implementation_runs_the_kernel_on_tensorrts_stream():
    """The JIT plugin's implementation queues the kernel and the copy into TensorRT's output on
    the stream TensorRT hands it (torch's current stream is not ordered with the engine's
    other layers); attributes reach the kernel by name, ints arrays as tuples."""
    import numpy as np

    from gate2deploy.runtimes import tensorrt_plugins as tp

    log = []

    class Scope:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream))

        def __exit__(self, *exc):
            log.append(("exit", self.stream))

    class Out:
        def copy_(self, y):
            log.append(("copy", y))

    class Kernels:
        @staticmethod
        def cg_conv(x, w, mask, thr, strides, pads, dilations):
            log.append(("kernel", x, strides, pads, dilations))
            return "Y"

    sentinel = {k: k for k in ("desc", "tensor", "ints", "int", "float", "string", "outputs", "stream", "return")}
    out = Out()
    _, impl = tp._plugin_functions(tp.PLUGINS["CGConv"], sentinel, Kernels, lambda t: t, Scope)
    impl("X", "W", "M", "T", np.array([2, 2]), np.array([1, 1, 1, 1]), np.array([1, 1]), (out,), 1234)
    assert log == [("enter", 1234), ("kernel", "X", (2, 2), (1, 1, 1, 1), (1, 1)), ("copy", "Y"),
                   ("exit", 1234)]


@pytest.mark.parametrize("batch", [1, 8])
def test_trt_onnx_runs_on_ort_at_batch_1_and_8_against_pytorch(trt_export, batch):
    """model.trt.onnx, with its plugin attributes, on ONNX Runtime CPU with the native ops."""
    out, *_ = trt_export
    model = onnx.load(str(out / "model.trt.onnx"))
    assert batch_dim(model.graph.input[0]) == "batch" and batch_dim(model.graph.output[0]) == "batch"
    check = check_against_torch(model, batch)
    assert check.passed, check.summary()
    assert check.gated["flipped_gates"] == 0


def test_export_flags_checked_before_any_work(tiny_ckpt, tmp_path):
    base = ["export", tiny_ckpt, "--model", TINY, "--input-shape", "2,3,8,8"]
    for extra, words in [(["--target", "trt", "--batch", "4,2,1"], "min <= opt <= max"),
                         (["--target", "trt", "--batch", "4,8,16"], "verification batch 2"),
                         (["--target", "trt", "--static-batch", "--batch", "1,2,4"], "static"),
                         (["--target", "onnx", "--batch", "1,2,4"], "only with --target trt"),
                         (["--target", "ort", "--fp16"], "only with --target trt")]:
        code, _, err = run_cli(*base, *extra, "-o", tmp_path / "m.engine")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert list(tmp_path.iterdir()) == []


@needs_tensorrt
@pytest.mark.tensorrt
def test_trt_engine_builds_and_matches_pytorch(trt_export):
    out, code, _, stderr = trt_export
    assert code == 0, stderr
    assert (out / "model.engine").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt"]["engine_max_rel_err"] <= report["tensorrt"]["engine_tolerance"]


# ------------------------------------------------------------------------------------------
# Dynamic batch on the other targets
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_export_at_batch_1_runs_at_batch_8(tiny_ckpt, tmp_path, target):
    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", tiny_ckpt, "--model", TINY, "--input-shape", "1,3,8,8",
                                "--target", target, "-o", out, "--physical-widths", "exact")
    assert code == 0, err
    assert "batch axis: dynamic (verified at batch 1, 2)" in stdout
    model = onnx.load(str(out))
    assert batch_dim(model.graph.input[0]) == "batch"
    # the fold happened at batch 1: the masked stem is 6 channels wide
    stem = next(i for i in model.graph.initializer if i.dims[:2] == [6, 3])
    assert stem is not None
    check = check_against_torch(model, 8)
    assert check.passed, check.summary()


def test_static_batch_pins_the_batch(tiny_ckpt, tmp_path):
    from gate2deploy.verify import make_session

    out = tmp_path / "m.onnx"
    code, stdout, err = run_cli("export", tiny_ckpt, "--model", TINY, "--input-shape", "2,3,8,8",
                                "--target", "ort", "-o", out, "--static-batch")
    assert code == 0, err
    assert "batch axis: static (verified at batch 2)" in stdout
    model = onnx.load(str(out))
    assert batch_dim(model.graph.input[0]) == 2 and batch_dim(model.graph.output[0]) == 2
    session = make_session(model)
    with pytest.raises(Exception, match="dimensions"):
        session.run(None, {"input": np.zeros((8, 3, 8, 8), np.float32)})


def test_pg_batch_of_8_is_not_8_batches_of_1(tiny_ckpt, tmp_path):
    """Why batch-8 outputs are compared with PyTorch on the same batch: PG's dynamic scale is
    the whole batch's max|X|, so a sample's output depends on the rest of its batch, in
    PyTorch and in the export alike."""
    from gate2deploy.verify import make_session

    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", tiny_ckpt, "--model", TINY, "--input-shape", "1,3,8,8",
                           "--target", "ort", "-o", out)
    assert code == 0, err
    session = make_session(onnx.load(str(out)))
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    x[5] *= 4  # one sample sets the batch's scale
    together = session.run(None, {"input": x})[0]
    alone = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(8)])
    with torch.no_grad():
        torch_together = tiny_model()(torch.from_numpy(x)).numpy()
    assert not np.allclose(together, alone, rtol=0, atol=1e-4 * np.abs(alone).max())
    np.testing.assert_allclose(together, torch_together, rtol=0, atol=1e-4 * np.abs(torch_together).max())


def test_a_model_that_only_runs_at_its_batch_keeps_it_static_and_says_why(tmp_path):
    """A torch.export program traced at batch 1 guards its batch: PyTorch cannot be compared at
    another batch, so the export keeps batch 1 (and verifies there) instead of an unverified axis."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(path))
    out, report = tmp_path / "net.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli("export", path, "-o", out, "--input-shape", "1,3,8,8", "--report", report)
    assert code == 0, err
    batch = json.loads(report.read_text())["batch"]
    assert batch["axis"] == "static" and batch["verified"] == [1] and "does not run at batch 2" in batch["note"]
    assert "note: the batch stays static at 1" in stdout
    assert batch_dim(onnx.load(str(out)).graph.input[0]) == 1

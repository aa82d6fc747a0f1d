"""Clumsy-user probes of issue 17 (item 7) at the command line: each gives one line and exit
2 (or the named warning), and leaves nothing behind."""
import json
from pathlib import Path

import torch

from cli_checks import assert_one_line_exit_2
from models.cifar_nets import randomize_batchnorm, vgg16_bn

CIFAR = Path(__file__).parent / "models" / "cifar_nets.py"


def _ckpt(tmp_path):
    ckpt = tmp_path / "v.pt"
    torch.save(randomize_batchnorm(vgg16_bn(width=0.125), seed=1).state_dict(), ckpt)
    return ckpt


def _export(cli, ckpt, *extra):
    return cli("export", ckpt, "--model", f"{CIFAR}:vgg16_bn", "--model-kwargs", '{"width": 0.125}',
               "--input-shape", "1,3,32,32", *extra)


def test_report_onto_the_model_path_is_refused(tmp_path, cli):
    out = tmp_path / "m.onnx"
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", out, "--report", out)
    assert code == 2 and "--report" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_naming_a_folder_is_refused(tmp_path, cli):
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", f"{tmp_path / 'newdir'}/")
    assert code == 2 and "names a folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "newdir").exists()


def test_netslim_density_zero_warns_by_name(tmp_path, cli):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", out, "--netslim-density", "0", "--report", report)
    assert code == 0 and "keeps no channel" in err
    assert json.loads(report.read_text())["mask_sources"]["netslim"]["emptied_layers"]


def test_profile_nan_criteria_weight_is_refused(tmp_path, cli):
    code, _, err = cli("profile", "--model", f"{CIFAR}:resnet20", "--input-shape", "1,3,32,32", "-o",
                       tmp_path / "lat", "--criteria-weight", "nan")
    assert code == 2 and "--criteria-weight must be a finite number" in err
    assert not (tmp_path / "lat").exists()


def test_predict_with_nan_or_negative_timings_is_refused(tmp_path, cli):
    from gate2deploy.profiling.lut import FORMAT
    for bad in (float("nan"), -1.0):
        lut = tmp_path / "lut.json"
        lut.write_text(json.dumps({"format": FORMAT, "entries": {"Conv/x": {"ms": bad}}}))
        code, _, err = cli("profile", "--predict", lut, "--channels", tmp_path / "cfg.json")
        assert code == 2 and "timing" in err and len(err.strip().splitlines()) == 1, err


def test_absurd_input_shapes_are_refused_before_allocating(tmp_path, cli):
    ckpt = _ckpt(tmp_path)
    for shape in ("1,3,99999999999999999999,2", "1,3,20000,20000"):
        result = cli("export", ckpt, "--model", f"{CIFAR}:vgg16_bn", "--model-kwargs", '{"width": 0.125}',
                     "--input-shape", shape, "-o", tmp_path / "m.onnx")
        assert_one_line_exit_2(result, "--max-input-elements")
    assert not (tmp_path / "m.onnx").exists()


def test_run_refuses_huge_shapes_and_thread_counts(tmp_path, cli):
    out = tmp_path / "m.onnx"
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", out)
    assert code == 0, err
    assert_one_line_exit_2(cli("run", out, "--input-shape", "100000x3x32x32"), "--max-input-elements")
    assert_one_line_exit_2(cli("run", out, "--threads", "100000"), "cores")


def test_demo_into_an_unwritable_place_is_one_line(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_exit_2(cli("demo", "-o", blocker / "sub"), "cannot create")


def test_an_output_onto_an_input_is_refused(tmp_path, cli):
    """-o naming the checkpoint itself, or the TensorRT model's config onto the report: the
    checkpoint (or the other output) would be replaced, with exit 0 before."""
    ckpt = _ckpt(tmp_path)
    before = ckpt.read_bytes()
    code, _, err = _export(cli, ckpt, "-o", ckpt)
    assert code == 2 and "is also an input (checkpoint)" in err and len(err.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before
    engine = tmp_path / "m.engine"
    code, _, err = _export(cli, ckpt, "--target", "trt", "-o", engine, "--report", tmp_path / "m.trt.json")
    assert code == 2 and "--report" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.pt"]


def test_a_long_output_name_is_written(tmp_path, cli):
    """A name of 250 characters is a valid file name: the temporary name beside it must not
    exceed the file system's 255 (it added ~15 characters to the whole name)."""
    out = tmp_path / ("m" * 245 + ".onnx")
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", out)
    assert code == 0, err
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failing_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk (ENOSPC) while writing: one line naming the file, no temporary left."""
    import errno

    import pytest

    from gate2deploy.errors import UserError
    from gate2deploy.fileio import atomic_path

    out = tmp_path / "r.json"
    with pytest.raises(UserError, match=r"cannot write .*r\.json: No space left on device"):
        with atomic_path(out) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def _identity_model(path, output_name="y", shape=(1, 4)):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], [output_name])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(shape))])
    import onnx
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime reads, whatever the onnx package writes
    onnx.save(model, str(path))
    return path


def test_run_saves_an_output_named_like_savez_parameters(tmp_path, cli):
    """An output named `file` (np.savez's own first parameter) is saved under its name."""
    import numpy as np

    model = _identity_model(tmp_path / "m.onnx", output_name="file")
    code, _, err = cli("run", model, "--save-outputs", tmp_path / "o.npz")
    assert code == 0, err
    with np.load(tmp_path / "o.npz") as data:
        assert list(data) == ["file"] and data["file"].shape == (1, 4)


def test_run_refuses_a_huge_declared_shape(tmp_path, cli):
    """A fixed input shape in the model is held to --max-input-elements like a given one."""
    model = _identity_model(tmp_path / "m.onnx", shape=(100000, 100000, 10))
    code, _, err = cli("run", model)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_debug_passes_onto_a_file_is_one_line(tmp_path, cli):
    blocker = tmp_path / "dump"
    blocker.write_text("x")
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", tmp_path / "m.onnx", "--debug-passes", blocker)
    assert code == 2 and "--debug-passes" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_demo_with_a_shape_resnet18_cannot_take_leaves_nothing(tmp_path, cli):
    """One channel instead of three: refused before the 45 MB checkpoint is written (it was
    left behind after the export failed)."""
    out = tmp_path / "d"
    assert_one_line_exit_2(cli("demo", "--input-shape", "1,1,32,32", "-o", out), "N,3,H,W")
    assert not out.exists()


def test_an_error_naming_a_path_with_a_newline_is_one_line(tmp_path, cli):
    assert_one_line_exit_2(_export(cli, tmp_path / "no\nsuch.pt", "-o", tmp_path / "m.onnx"), "no\\nsuch.pt")


def test_float64_inputs_out_of_float32_range_warn_in_one_line(tmp_path, cli, recwarn):
    """1e39 does not fit float32: the `warning:` line says so; numpy's own overflow warning
    is not passed on."""
    import numpy as np

    np.save(tmp_path / "big.npy", np.full((1, 3, 32, 32), 1e39))
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", tmp_path / "m.onnx", "--sample-inputs", tmp_path / "big.npy")
    assert err.count("warning:") == 1 and "largest relative change inf" in err, err
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "overflow" in str(w.message)]


def test_a_report_that_cannot_be_written_takes_the_model_with_it(tmp_path, cli, monkeypatch):
    """The model is written, then the report fails (a full disk, as fileio.atomic_path reports
    it): nothing is left, as for any failed export."""
    from gate2deploy.cli import export as export_cli
    from gate2deploy.errors import UserError

    def full_disk(path, text):
        raise UserError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(export_cli, "write_text", full_disk)
    out, report = tmp_path / "out" / "m.onnx", tmp_path / "out" / "r.json"
    out.parent.mkdir()
    code, _, err = _export(cli, _ckpt(tmp_path), "-o", out, "--report", report)
    assert code == 2 and "No space left" in err and len(err.strip().splitlines()) == 1, err
    assert list(out.parent.iterdir()) == []


def test_first_line_quotes_one_line_of_an_underlying_failure():
    """errors.first_line, which every one-line report of an underlying exception uses: the
    message's first non-blank line (leading blank lines are not a message), else the type's name."""
    from gate2deploy.errors import first_line

    assert first_line(ValueError("bad header\n  at byte 12")) == "bad header"
    assert first_line(OSError("\n\nno space left on device\nmore")) == "no space left on device"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   ")) == "RuntimeError"

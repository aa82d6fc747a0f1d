"""Issue 17, the findings left after items 1-4 (each test failed before its fix):
weights silently cast (complex, integer, inexact float64), sys.exit in the user's model code
ending gate2deploy silently, damaged or pickled --sample-inputs / run --input files ending in
a traceback, argparse usage errors of several lines, outputs created mode 0600, and SIGTERM
during the final write leaving a `.tmp` file."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_checks import assert_one_line_exit_2

TINY = textwrap.dedent("""
    import sys
    from torch import nn
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    def exits():
        sys.exit(0)
""")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker file: proof that code ran
        return (open, (self.marker, "w"))


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        spec = importlib.util.spec_from_file_location("tiny_for_test", tmp_path / "tiny.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(tmp_path))
    ckpt = tmp_path / "ok.pt"
    torch.save(module.net().state_dict(), ckpt)
    return tmp_path, module


def _export(cli, tmp_path, ckpt, *extra, fn="net"):
    return cli("export", ckpt, "--model", f"{tmp_path / 'tiny.py'}:{fn}", "--input-shape", "1,3,8,8",
               "-o", tmp_path / "m.onnx", *extra)


def _save_converted(tmp_path, module, name, convert):
    path = tmp_path / name
    torch.save({k: convert(v) if v.is_floating_point() else v for k, v in module.net().state_dict().items()}, path)
    return path


def test_complex_and_integer_weights_are_refused_by_name(tiny, cli):
    tmp_path, module = tiny
    for name, convert, words in (("c.pt", lambda v: v.to(torch.complex64), ("complex", "0.weight")),
                                 ("i.pt", lambda v: (v * 100).to(torch.int8), ("integer", "int8", "0.weight")),
                                 # 1/3 in float64 has no exact float32: rounding it would approximate silently
                                 ("d.pt", lambda v: v.double() + 1 / 3 * 2**-40, ("float64", "exactly"))):
        ckpt = _save_converted(tmp_path, module, name, convert)
        assert_one_line_exit_2(_export(cli, tmp_path, ckpt), *words)
        assert not (tmp_path / "m.onnx").exists()


def test_half_precision_weights_convert_exactly_and_are_reported(tiny, cli):
    tmp_path, module = tiny
    half = _save_converted(tmp_path, module, "h.pt", lambda v: v.half())
    report = tmp_path / "r.json"
    code, _, err = _export(cli, tmp_path, half, "--report", report)
    assert code == 0, err
    notes = json.loads(report.read_text())["mask_sources"]["weight_dtype_conversions"]
    assert any("float16 converted exactly to float32" in n for n in notes), notes
    # independent check of "exact": the loaded model's weights equal numpy's widening of the
    # stored float16 values
    from gate2deploy.loading import load_weights
    fresh = module.net()
    load_weights(fresh, torch.load(half), "h.pt")
    stored = torch.load(half)["0.weight"].numpy()
    assert np.array_equal(fresh[0].weight.detach().numpy(), stored.astype(np.float32))


def test_sys_exit_in_the_model_code_is_named(tiny, cli):
    tmp_path, _ = tiny
    line = assert_one_line_exit_2(_export(cli, tmp_path, tmp_path / "ok.pt", fn="exits"), "sys.exit(0)", "tiny.py:")
    where = line.split(" at ", 1)[1].split(";")[0]
    exit_line = TINY.splitlines().index("    sys.exit(0)") + 1
    assert where == f"{tmp_path / 'tiny.py'}:{exit_line}", line


def test_damaged_or_pickled_sample_inputs_are_one_line_and_run_nothing(tiny, cli):
    tmp_path, _ = tiny
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x)
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:300])
    np.save(tmp_path / "c.npy", x.astype(np.complex64))
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "p.pt")
    for name, words in (("trunc.npz", ("trunc.npz", "damaged")), ("c.npy", ("complex",)),
                        ("p.pt", ("pickles Python objects",))):
        assert_one_line_exit_2(_export(cli, tmp_path, tmp_path / "ok.pt", "--sample-inputs", tmp_path / name), *words)
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_pickle_protocol_4_is_named_not_called_damaged(tiny, cli):
    """torch.save(..., pickle_protocol=4): torch's safe loader (weights_only) cannot read it
    and warned on stderr (three lines in all); the file is neither damaged nor pickling
    objects: one line naming the protocol, for checkpoints and tensor inputs alike; with
    --trust-pickle the checkpoint loads."""
    tmp_path, module = tiny
    torch.save(module.net().state_dict(), tmp_path / "p4.pt", pickle_protocol=4)
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "x4.pt", pickle_protocol=4)
    assert_one_line_exit_2(_export(cli, tmp_path, tmp_path / "p4.pt"), "pickle protocol 4")
    assert_one_line_exit_2(_export(cli, tmp_path, tmp_path / "ok.pt", "--sample-inputs", tmp_path / "x4.pt"),
                           "pickle protocol 4")
    code, _, err = _export(cli, tmp_path, tmp_path / "p4.pt", "--trust-pickle")
    assert code == 0, err


def test_run_input_files_of_other_kinds(tiny, cli):
    tmp_path, _ = tiny
    code, _, err = _export(cli, tmp_path, tmp_path / "ok.pt", "--static-batch")
    assert code == 0, err
    import onnx
    name = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "c.npy", x.astype(np.complex64))
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    code, out, err = cli("run", tmp_path / "m.onnx", "--input", f"{name}=" + str(tmp_path / "x.npz"))
    assert code == 0, err  # an .npz of one array is an input file like .npy
    assert_one_line_exit_2(cli("run", tmp_path / "m.onnx", "--input", f"{name}=" + str(tmp_path / "c.npy")), "complex")
    assert_one_line_exit_2(cli("run", tmp_path / "m.onnx", "--input", f"{name}=" + str(tmp_path / "s.npy")),
                           "not numbers")


def test_usage_error_stderr_is_one_line(capsys):
    from gate2deploy.cli import main
    with pytest.raises(SystemExit):
        main(["export", "--no-such-flag"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], lines


def test_outputs_get_the_umask_mode_not_0600(tmp_path):
    from gate2deploy.fileio import write_text
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644  # what open() gives under umask 022


SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import onnx
    def slow_save(model, path, *a, **k):  # the final write, caught half-way
        Path(path).write_bytes(b"partial")
        Path(sys.argv[1]).write_text("writing")
        time.sleep(60)
    onnx.save = slow_save
    from gate2deploy.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigterm_during_the_final_write_leaves_no_tmp(tiny):
    tmp_path, _ = tiny
    ready = tmp_path / "ready"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(ready), "export", str(tmp_path / "ok.pt"),
                             "--model", f"{tmp_path / 'tiny.py'}:net", "--input-shape", "1,3,8,8",
                             "-o", str(out_dir / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()
    assert any(p.name.endswith(".tmp") for p in out_dir.iterdir())  # caught inside the write
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(err.strip().splitlines()) == 1 and "SIGTERM" in err, err
    assert list(out_dir.iterdir()) == []


def test_zip_archives_damaged_in_their_directory_or_data_are_one_line(tmp_path, cli):
    """Found by the corpus fuzzer (tests/cli_fuzz.py): a bit flip that makes a member name
    undecodable (UnicodeDecodeError in zipfile) or breaks a member's CRC (BadZipFile on read)
    escaped the loader as a traceback."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/\u00e9/data.pkl", b"\x80\x02}q\x00.")  # a non-ASCII name: zip's UTF-8 flag set
    names_broken = buf.getvalue().replace("\u00e9".encode(), b"\xe8A")  # now invalid UTF-8
    (tmp_path / "names.pt").write_bytes(names_broken)
    assert_one_line_exit_2(cli("info", tmp_path / "names.pt", "--input-shape", "1,4"), "names.pt", "damaged")

    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(1, 4),)), str(pt2))
    data = bytearray(pt2.read_bytes())
    at = data.index(b'"config"')  # inside the stored weights config: its CRC no longer matches
    data[at + 1] ^= 0x01
    (tmp_path / "crc.pt2").write_bytes(bytes(data))
    assert_one_line_exit_2(cli("export", tmp_path / "crc.pt2", "--input-shape", "1,4", "-o", tmp_path / "m.onnx"),
                           "crc.pt2", "damaged")
    assert not (tmp_path / "m.onnx").exists()


def test_memory_estimate_is_the_peak_of_live_activations(tiny):
    from gate2deploy.memory import estimate
    _, module = tiny
    est = estimate(module.net().eval(), (3, 3, 40, 40))
    # by hand: the peak is while BatchNorm runs: conv1's output and BN's output, both
    # (3, 8, 40, 40) float32, are alive; every later tensor is smaller
    assert est.activation_bytes == 2 * 3 * 8 * 40 * 40 * 4
    assert est.input_bytes == 3 * 3 * 40 * 40 * 4 and est.batch == 3


def test_export_refused_above_max_memory_at_the_verified_batch(tiny, cli):
    tmp_path, _ = tiny
    ckpt = tmp_path / "ok.pt"
    # 1x3x512x512: the dynamic batch is verified at 2 as well -> 2 x (2*8*512*512*4 B) of activations
    # (PyTorch and ORT) = 64 MiB plus weights and input: above 0.05 GiB
    args = ("export", ckpt, "--model", f"{tmp_path / 'tiny.py'}:net", "--input-shape", "1,3,512,512",
            "-o", tmp_path / "m.onnx")
    assert_one_line_exit_2(cli(*args, "--max-memory", "0.05"), "--max-memory", "batch 2")
    # static: 2 x (2*1*8*512*512*4 B) + input = 35 MiB: above 0.03 GiB, below 0.05 GiB
    assert_one_line_exit_2(cli(*args, "--max-memory", "0.03", "--static-batch"), "batch 1")
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = cli(*args, "--max-memory", "0.05", "--static-batch")
    assert code == 0, err


def test_pt2_whose_weight_is_cut_short_is_one_line(tmp_path, cli):
    """Found by the corpus fuzzer: torch.export.load logs the failed deserialization with its
    traceback on stderr before raising; the refusal must stay one line."""
    import zipfile
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(nn.Linear(4, 2), (torch.randn(1, 4),)), str(pt2))
    with zipfile.ZipFile(pt2) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(tmp_path / "cut.pt2", "w") as z:
        for name, data in entries.items():
            z.writestr(name, data[:4] if "/data/weights/weight_" in name else data)
    # a subprocess: in-process, pytest's log capture would swallow the logged traceback
    proc = subprocess.run([sys.executable, "-m", "gate2deploy", "info", str(tmp_path / "cut.pt2"), "--input-shape",
                           "1,4"], capture_output=True, text=True)
    assert_one_line_exit_2((proc.returncode, proc.stdout, proc.stderr), "cut.pt2")


def test_run_memory_estimate_and_refusal(tiny, cli):
    tmp_path, _ = tiny
    code, _, err = _export(cli, tmp_path, tmp_path / "ok.pt")
    assert code == 0, err
    from gate2deploy.memory import check_onnx_run
    feeds = {"input": np.zeros((8, 3, 8, 8), np.float32)}
    # by hand, the folded graph Conv(BN folded) -> Relu -> Conv -> GlobalAveragePool -> Flatten at batch 8:
    # weights (8*3*9 + 8 + 4*8*9 + 4) floats, input 8*3*8*8, two 8x8x8x8 tensors, 8x4x6x6, two 8x4
    expected = 4 * ((8 * 3 * 9 + 8 + 4 * 8 * 9 + 4) + 8 * 3 * 8 * 8 + 2 * 8 * 8 * 8 * 8 + 8 * 4 * 6 * 6 + 2 * 8 * 4)
    assert check_onnx_run(tmp_path / "m.onnx", feeds, None) == expected
    assert_one_line_exit_2(cli("run", tmp_path / "m.onnx", "--input-shape", "8x3x8x8", "--max-memory", "1e-5"),
                           "--max-memory")
    code, _, err = cli("run", tmp_path / "m.onnx", "--input-shape", "8x3x8x8", "--max-memory", "1e-4")
    assert code == 0, err

"""Issue 17 item 1: a torch.export archive (.pt2) whose weights, constants or sample inputs
are pickles runs that pickle's code inside torch.export.load (weights_only=False in torch's
pt2 loader). Without --trust-pickle it must be refused by name before torch touches it, and
the payload must not run."""
import io
import json
import zipfile

import pytest
import torch

from cli_checks import assert_one_line_exit_2


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker file: proof that code ran
        return (open, (self.marker, "w"))


def _pt2(tmp_path, tamper):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)), str(path))
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    tamper(entries)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    return path


def _pickled_payload(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(str(marker)), buf)
    return buf.getvalue()


def _weight_as_pickle(marker):
    def tamper(entries):
        cfg_name = next(n for n in entries if n.endswith("data/weights/model_weights_config.json"))
        cfg = json.loads(entries[cfg_name])
        meta = cfg["config"]["weight"]
        meta["use_pickle"] = True
        entries[cfg_name] = json.dumps(cfg).encode()
        weight_file = next(n for n in entries if n.endswith("data/weights/" + meta["path_name"]))
        entries[weight_file] = _pickled_payload(marker)
    return tamper


def _sample_inputs_as_pickle(marker):
    def tamper(entries):
        name = next(n for n in entries if "/data/sample_inputs/" in n)
        entries[name] = _pickled_payload(marker)
    return tamper


@pytest.mark.parametrize("make, what", [(_weight_as_pickle, "stored as a pickle"),
                                        (_sample_inputs_as_pickle, "sample inputs")])
def test_pickled_pt2_is_refused_without_trust_and_runs_nothing(tmp_path, cli, make, what):
    marker = tmp_path / "payload_ran"
    path = _pt2(tmp_path, make(marker))
    result = cli("export", path, "--input-shape", "1,4", "-o", tmp_path / "m.onnx")
    assert_one_line_exit_2(result, what, "--trust-pickle")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()
    for cmd in (("info", path, "--input-shape", "1,4"),):
        assert_one_line_exit_2(cli(*cmd), "--trust-pickle")
    assert not marker.exists()


def test_plain_pt2_still_loads(tmp_path, cli):
    path = _pt2(tmp_path, lambda entries: None)
    code, _, err = cli("export", path, "--input-shape", "1,4", "-o", tmp_path / "m.onnx")
    assert code == 0, err

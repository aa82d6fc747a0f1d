"""Bad input: one-line error naming the problem, exit code 2, no output file left behind."""
import os

import pytest
import torch
from torch import nn

from gate2deploy.importers.gator import make_gator_checkpoint
from cli_checks import assert_one_line_exit_2

CIFAR = "tests/models/cifar_nets.py"


def _export(cli, ckpt, out, *extra, model=f"{CIFAR}:resnet20", shape="1,3,32,32"):
    args = ["export", ckpt, "-o", out, "--input-shape", shape, *extra]
    if model:
        args += ["--model", model]
    return cli(*args)


def _assert_clean_failure(result, out_dir, *words):
    assert_one_line_exit_2(result, *words)
    left = [p for p in os.listdir(out_dir) if p.endswith((".onnx", ".json", ".tmp")) or p.startswith(".")]
    assert not left, left


@pytest.fixture
def r20_ckpt(tmp_path):
    from models.cifar_nets import resnet20
    path = tmp_path / "r20.pt"
    torch.save(resnet20().state_dict(), path)
    return path


def test_missing_checkpoint(tmp_path, cli):
    _assert_clean_failure(_export(cli, tmp_path / "nope.pt", tmp_path / "m.onnx"), tmp_path, "does not exist")


def test_truncated_checkpoint(tmp_path, cli, r20_ckpt):
    data = r20_ckpt.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    _assert_clean_failure(_export(cli, bad, tmp_path / "m.onnx"), tmp_path, "trunc.pt", "checkpoint")


def test_not_a_checkpoint(tmp_path, cli):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, not a model\n")
    _assert_clean_failure(_export(cli, bad, tmp_path / "m.onnx"), tmp_path, "not a", "checkpoint")


def test_pickled_module_refused_without_flag_and_accepted_with_it(tmp_path, cli):
    from models.cifar_nets import resnet20
    path = tmp_path / "whole.pt"
    torch.save(resnet20(), path)
    _assert_clean_failure(_export(cli, path, tmp_path / "m.onnx", model=None), tmp_path, "--trust-pickle")
    code, _, err = _export(cli, path, tmp_path / "m.onnx", "--trust-pickle", model=None)
    assert code == 0, err
    assert (tmp_path / "m.onnx").exists()


def test_keys_that_do_not_fit_the_model(tmp_path, cli, r20_ckpt):
    _assert_clean_failure(_export(cli, r20_ckpt, tmp_path / "m.onnx", model=f"{CIFAR}:vgg16_bn"),
                          tmp_path, "does not fit the model", "missing")


def test_shapes_that_do_not_fit_the_model(tmp_path, cli):
    from models.cifar_nets import resnet20
    sd = resnet20(num_classes=100).state_dict()
    path = tmp_path / "c100.pt"
    torch.save(sd, path)
    _assert_clean_failure(_export(cli, path, tmp_path / "m.onnx"), tmp_path, "another shape", "fc.weight")


def test_input_shape_that_does_not_fit(tmp_path, cli, r20_ckpt):
    _assert_clean_failure(_export(cli, r20_ckpt, tmp_path / "m.onnx", shape="1,4,32,32"), tmp_path,
                          "--input-shape 1,4,32,32 does not fit")
    _assert_clean_failure(_export(cli, r20_ckpt, tmp_path / "m.onnx", shape="1,x,3"), tmp_path, "--input-shape")


def test_state_dict_without_model_flag(tmp_path, cli, r20_ckpt):
    _assert_clean_failure(_export(cli, r20_ckpt, tmp_path / "m.onnx", model=None), tmp_path, "--model")


def test_unwritable_output(tmp_path, cli, r20_ckpt):
    _assert_clean_failure(_export(cli, r20_ckpt, tmp_path / "no_such_dir" / "m.onnx"), tmp_path, "does not exist")


def test_gator_checkpoint_with_a_gate_missing(tmp_path, cli):
    ckpt = tmp_path / "g.pth"
    make_gator_checkpoint(ckpt, keep=0.5, arch="resnet18")
    data = torch.load(ckpt)
    # 10 gates fit neither of Gator's orders for ResNet-18 (12, or 11 with no_last_conv)
    data["state_dict"] = {k: v for k, v in data["state_dict"].items()
                          if not k.startswith(("forward_hooks.10.", "forward_hooks.11."))}
    torch.save(data, ckpt)
    _assert_clean_failure(_export(cli, ckpt, tmp_path / "m.onnx", model="torchvision.models:resnet18",
                                  shape="1,3,64,64"), tmp_path, "10 gates", "12 hyper-edges", "or 11")


# Masks the fold cannot honour: a user model with gate2deploy.nn masks ------------------
MASKED_MODELS = '''
import torch
from torch import nn
from gate2deploy.nn import ChannelMask

class Residual(nn.Module):
    """Two residual branches whose masks disagree on the coupled channels."""
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.mask_a = ChannelMask(torch.tensor([1., 0, 1, 0, 1, 1, 1, 1]))
        self.mask_b = ChannelMask(torch.tensor([1., 1, 1, 1, 1, 1, 0, 0]))
        self.head = nn.Conv2d(8, 4, 1)
    def forward(self, x):
        return self.head(torch.relu(self.mask_a(self.a(x)) + self.mask_b(self.b(x))))

class MaskedOutput(nn.Module):
    """A mask on the graph output: its channels cannot be removed."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.mask = ChannelMask(torch.tensor([1., 0, 1, 0, 1, 1]))
    def forward(self, x):
        return self.mask(self.conv(x))
'''


@pytest.mark.parametrize("model,words", [("Residual", ["disagree", "--keep-unfoldable"]),
                                         ("MaskedOutput", ["graph output", "--keep-unfoldable"])])
def test_unfoldable_masks_fail_by_default_and_are_kept_exactly_on_request(tmp_path, cli, model, words):
    (tmp_path / "masked.py").write_text(MASKED_MODELS)
    import importlib.util
    spec = importlib.util.spec_from_file_location("masked_models", tmp_path / "masked.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ckpt = tmp_path / "m.pt"
    torch.save(getattr(mod, model)().state_dict(), ckpt)
    target = f"{tmp_path / 'masked.py'}:{model}"
    out = tmp_path / "m.onnx"
    _assert_clean_failure(_export(cli, ckpt, out, model=target, shape="2,3,8,8"), tmp_path, *words)
    code, stdout, err = _export(cli, ckpt, out, "--keep-unfoldable", model=target, shape="2,3,8,8")
    assert code == 0, err
    assert "kept as Mul" in stdout
    import onnx
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "ChannelMask" not in ops and "Mul" in ops


def test_cli_usage_error_exit_code(cli):
    with pytest.raises(SystemExit) as exc:
        cli("export")
    assert exc.value.code == 2


def test_nn_channel_mask_misfit_is_a_clear_error():
    from gate2deploy.nn import ChannelMask
    with pytest.raises(ValueError, match="does not fit"):
        ChannelMask(torch.ones(3))(torch.zeros(1, 4, 2, 2))
    assert isinstance(ChannelMask(4), nn.Module)

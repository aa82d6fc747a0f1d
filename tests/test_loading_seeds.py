"""The loader on checkpoints laid out as the seeds write them, and on their model files.

- state_dict `_metadata` survives unwrapping and `module.` stripping (torchvision's MNASNet
  refuses to load without its version);
- a Joslim checkpoint (joslim.py, `torch.save({'model_state_dict', 'optim_state_dict',
  'epoch', 'population_data', 'X', 'Y', 'ratio_visited'})`: numpy arrays and scalars among
  the extra entries) loads under the safe loader, with no --trust-pickle;
- a sensAI group checkpoint (cifar_group.py: `torch.save(model, ...)`, a whole pickled
  module) is refused by naming its class, and with --trust-pickle a class that cannot be
  imported is named by module with the --model-path hint;
- JSON or random bytes named .pt are "not a PyTorch checkpoint", never "needs trust";
- `--model repo/model/net.py:Net` resolves `from utils.helpers import ...` from the
  repository's root without flags; other layouts take --model-path.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from gate2deploy.errors import UserError
from gate2deploy.loading import build_model, import_root, load_checkpoint, load_weights
from cli_checks import assert_one_line_exit_2




# -- state_dict metadata ----------------------------------------------------------------
class NeedsVersion(nn.Module):
    """Reads its version from the state_dict's metadata, as torchvision's MNASNet does
    (torchvision/models/mnasnet.py, MNASNet._load_from_state_dict)."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError("version should be set to 1 or 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = NeedsVersion()


@pytest.mark.parametrize("wrap", ["plain", "dataparallel_in_dict"])
def test_metadata_survives_unwrapping_and_prefix_stripping(tmp_path, wrap):
    model = Holder()
    sd = model.state_dict()
    if wrap == "dataparallel_in_dict":
        sd = {"model_state_dict": nn.DataParallel(model).state_dict(), "epoch": 3}
    torch.save(sd, tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    # Expected: the metadata nn.Module.state_dict writes for the bare model.
    assert dict(ckpt.state_dict._metadata) == dict(Holder().state_dict()._metadata)
    load_weights(Holder(), ckpt.state_dict, "c.pt")  # raises without the metadata


def test_torchvision_mnasnet_state_dict_loads(tmp_path):
    torch.save(torchvision.models.mnasnet0_5().state_dict(), tmp_path / "m.pt")
    target = torchvision.models.mnasnet0_5()
    load_weights(target, load_checkpoint(tmp_path / "m.pt").state_dict, "m.pt")


def test_a_module_refusing_its_weights_is_one_line(tmp_path, cli):
    sd = Holder().state_dict()
    sd._metadata[""]["version"] = 1  # what an old torchvision writes for some modules
    sd._metadata["body"]["version"] = 1
    torch.save(sd, tmp_path / "old.pt")
    (tmp_path / "holder.py").write_text(textwrap.dedent('''
        import sys
        sys.path.insert(0, %r)
        from test_loading_seeds import Holder
    ''' % os.path.dirname(__file__)))
    assert_one_line_exit_2(cli("export", tmp_path / "old.pt", "--model", f"{tmp_path / 'holder.py'}:Holder",
                         "--input-shape", "1,3,4,4", "-o", tmp_path / "m.onnx"),
                     "does not load into the model", "version")


# -- Joslim: numpy entries under the safe loader -------------------------------------------
def _joslim_checkpoint(path, model):
    """The layout of joslim.py's checkpoint (Joslim/joslim.py, the `torch.save` at the end of
    each epoch): DataParallel weights, an SGD state, the population of sampled widths."""
    wrapped = nn.DataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    rng = np.random.default_rng(0)
    population = [{"loss": np.float64(2.5), "flops": np.float64(1.5e6), "ratio": np.float64(0.5),
                   "filters": rng.integers(1, 8, size=4)} for _ in range(3)]
    data = {"model_state_dict": wrapped.state_dict(), "optim_state_dict": opt.state_dict(), "epoch": 7,
            "population_data": population, "X": rng.random((3, 4)), "Y": [[0, np.float32(0.5)], [1.2, 0.3]],
            "ratio_visited": [np.float64(0.4), np.float64(0.6)]}
    torch.save(data, path)
    return data


def test_joslim_checkpoint_loads_without_trust(tmp_path, cli):
    from models.cifar_nets import resnet20
    path = tmp_path / "joslim.pt"
    saved = _joslim_checkpoint(path, resnet20())
    ckpt = load_checkpoint(path)
    assert np.array_equal(ckpt.meta["X"], saved["X"]) and ckpt.meta["X"].dtype == np.float64
    assert ckpt.meta["population_data"][1]["flops"] == 1.5e6
    assert isinstance(ckpt.meta["ratio_visited"][0], np.float64)
    model = resnet20()
    load_weights(model, ckpt.state_dict, str(path))
    code, _, err = cli("export", path, "--model", "tests/models/cifar_nets.py:resnet20",
                       "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert code == 0, err


def test_numpy_object_arrays_still_need_trust(tmp_path, cli):
    # Object arrays rebuild arbitrary Python objects: not on the allow-list.
    from models.cifar_nets import resnet20
    torch.save({"state_dict": resnet20().state_dict(), "extra": np.array([{"a": 1}], dtype=object)},
               tmp_path / "obj.pt")
    assert_one_line_exit_2(cli("export", tmp_path / "obj.pt", "--model", "tests/models/cifar_nets.py:resnet20",
                         "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx"),
                     "ObjectDType", "--trust-pickle")


# -- sensAI: a whole pickled module ----------------------------------------------------
VGG_SOURCE = '''
import torch.nn as nn

class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Linear(8, 4)
    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))
'''


@pytest.fixture
def sensai_repo(tmp_path):
    """A repository like sensAI's: `groupnets/cifar/vgg.py`, and a group checkpoint saved by
    `torch.save(model)` from the repository's root (sensAI/cifar_group.py)."""
    repo = tmp_path / "repo"
    (repo / "groupnets" / "cifar").mkdir(parents=True)
    (repo / "groupnets" / "__init__.py").write_text("")
    (repo / "groupnets" / "cifar" / "__init__.py").write_text("")
    (repo / "groupnets" / "cifar" / "vgg.py").write_text(VGG_SOURCE)
    (repo / "checkpoint").mkdir()
    subprocess.run([sys.executable, "-c", "import torch; from groupnets.cifar.vgg import VGG; "
                    "torch.save(VGG(), 'checkpoint/group0.pth')"], cwd=repo, check=True)
    return repo


def _export_pickled(cli, ckpt, out, *extra):
    return cli("export", ckpt, "--input-shape", "1,3,8,8", "-o", out, *extra)


def test_pickled_module_refusal_names_the_class(sensai_repo, tmp_path, cli):
    line = assert_one_line_exit_2(_export_pickled(cli, sensai_repo / "checkpoint" / "group0.pth", tmp_path / "m.onnx"),
                            "groupnets.cifar.vgg.VGG", "--trust-pickle", "whole module")
    assert not (tmp_path / "m.onnx").exists(), line


def test_trusted_pickle_with_missing_class_names_the_module(sensai_repo, tmp_path, cli):
    ckpt = sensai_repo / "checkpoint" / "group0.pth"
    line = assert_one_line_exit_2(_export_pickled(cli, ckpt, tmp_path / "m.onnx", "--trust-pickle"),
                            "'groupnets'", "--model-path", absent=["not a readable"])
    assert str(sensai_repo) in line  # the folder above the checkpoint that holds groupnets/
    code, _, err = _export_pickled(cli, ckpt, tmp_path / "m.onnx", "--trust-pickle", "--model-path", sensai_repo)
    assert code == 0, err


# -- files that are not checkpoints ----------------------------------------------------
@pytest.mark.parametrize("content", [b'{"state_dict": {"w": [1, 2]}}\n', bytes(range(7, 250)) * 3,
                                     b"\x80\x02garbage that is not a pickle"])
def test_non_checkpoints_are_not_called_pickles(tmp_path, cli, content):
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    assert_one_line_exit_2(cli("export", bad, "--model", "tests/models/cifar_nets.py:resnet20",
                         "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx"),
                     "not a", "PyTorch checkpoint", absent=["--trust-pickle", "pickles"])


# -- --model file.py in its repository -----------------------------------------------------
NET_SOURCE = '''
import torch
from torch import nn
from utils.helpers import Scale

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = Scale()
    def forward(self, x):
        return self.scale(self.conv(x))
'''
HELPERS_SOURCE = '''
import torch
from torch import nn

class Scale(nn.Module):
    FACTOR = %s
    def forward(self, x):
        return x * self.FACTOR
'''


def _repo(root, factor="2.0"):
    (root / "model").mkdir(parents=True)
    (root / "utils").mkdir()
    (root / "utils" / "__init__.py").write_text("")
    (root / "utils" / "helpers.py").write_text(HELPERS_SOURCE % factor)
    (root / "model" / "net.py").write_text(NET_SOURCE)
    return root


def test_model_file_imports_its_siblings_from_the_repository_root(tmp_path, cli, monkeypatch):
    repo = _repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert import_root(repo / "model" / "net.py") == repo.resolve()
    model = build_model(f"{repo / 'model' / 'net.py'}:Net")
    torch.save(model.state_dict(), tmp_path / "net.pt")
    code, _, err = cli("export", tmp_path / "net.pt", "--model", f"{repo / 'model' / 'net.py'}:Net",
                       "--input-shape", "1,3,8,8", "-o", tmp_path / "m.onnx")
    assert code == 0, err


def test_two_repositories_with_the_same_package_names_each_get_their_own(tmp_path):
    # One process, two seed checkouts that both have `utils`: each build imports its own.
    a, b = _repo(tmp_path / "a", "2.0"), _repo(tmp_path / "b", "3.0")
    x = torch.ones(1, 3, 8, 8)
    for repo, factor in ((a, 2.0), (b, 3.0), (a, 2.0)):
        model = build_model(f"{repo / 'model' / 'net.py'}:Net")
        assert model.scale.FACTOR == factor
        assert torch.equal(model(x), model.conv(x) * factor)


def test_model_file_elsewhere_needs_model_path(tmp_path, cli):
    _repo(tmp_path / "lib")
    (tmp_path / "lib" / "model" / "net.py").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "net.py").write_text(NET_SOURCE)
    spec = f"{tmp_path / 'elsewhere' / 'net.py'}:Net"
    with pytest.raises(UserError, match=r"imports module 'utils'.*--model-path"):
        build_model(spec)
    model = build_model(spec, model_paths=[tmp_path / "lib"])
    torch.save(model.state_dict(), tmp_path / "net.pt")
    args = ["export", tmp_path / "net.pt", "--model", spec, "--input-shape", "1,3,8,8", "-o", tmp_path / "m.onnx"]
    assert_one_line_exit_2(cli(*args), "'utils'", "--model-path")
    code, _, err = cli(*args, "--model-path", tmp_path / "lib")
    assert code == 0, err


def test_model_path_must_be_a_folder(tmp_path, cli):
    from models.cifar_nets import resnet20
    torch.save(resnet20().state_dict(), tmp_path / "r.pt")
    assert_one_line_exit_2(cli("export", tmp_path / "r.pt", "--model", "tests/models/cifar_nets.py:resnet20",
                         "--model-path", tmp_path / "nope", "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx"),
                     "--model-path", "is not a folder")


def test_import_root_of_a_self_contained_file(tmp_path):
    (tmp_path / "solo.py").write_text("import torch\nimport collections\nimport numpy\n")
    assert import_root(tmp_path / "solo.py") is None


def test_model_file_inside_a_package_uses_relative_imports(tmp_path):
    # Joslim's layout: model/__init__.py, model/slim_resnet.py with `from .dyn_model import`.
    pkg = tmp_path / "repo" / "model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text("from torch import nn\nclass Block(nn.Conv2d):\n    pass\n")
    (pkg / "net.py").write_text("from .blocks import Block\ndef build():\n    return Block(3, 5, 1)\n")
    model = build_model(f"{pkg / 'net.py'}:build")
    assert type(model).__module__ == "model.blocks" and model.out_channels == 5


def test_torchscript_archive_is_named(tmp_path, cli):
    torch.jit.save(torch.jit.trace(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4)), tmp_path / "ts.pt")
    assert_one_line_exit_2(cli("export", tmp_path / "ts.pt", "--input-shape", "1,3,4,4", "-o", tmp_path / "m.onnx"),
                     "TorchScript archive", absent=["--trust-pickle", "truncated"])


def test_builder_option_missing_from_model_kwargs_is_named(tmp_path):
    # dnn-gating's builders read their options as kwargs['partitions'] (model/cg_cifar10_resnet.py).
    (tmp_path / "seed.py").write_text("from torch import nn\ndef resnet20(**kwargs):\n"
                                      "    return nn.Conv2d(3, kwargs['partitions'], 1)\n")
    with pytest.raises(UserError, match=r"option 'partitions' that was not given: pass it in --model-kwargs"):
        build_model(f"{tmp_path / 'seed.py'}:resnet20")
    assert build_model(f"{tmp_path / 'seed.py'}:resnet20", '{"partitions": 4}').out_channels == 4

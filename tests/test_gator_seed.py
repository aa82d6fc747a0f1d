"""Gator checkpoints written the way Gator writes them, exported and compared with the network
as Gator runs it, not with the importer's reading of it.

Everything that decides the expected output is re-stated here from Gator's code, apart from
gate2deploy's importer:
- the hyper-edge order: `reference_hyper_edges`, following gator/models/gates_mapper.py
  `ResNetGatesModulesMapper.map_modules_inner` and `NaiveSequentialGatesModulesMapper.
  map_modules_inner` statement by statement; for ResNet-18 the order is also written out by hand
  (`RESNET18_ORDER`), read off that function;
- the checkpoint layout: `GatorWrapped` has the attribute names of gator/models/
  net_auxiliary_extension.py `NetWithAuxiliaryOutputs` (`net`, `forward_hooks`) and of
  channel_gates.py `ModulesChannelsGatingHooks.gating_module` / `ChannelsLogisticGatingMasked`
  (`gating_weights`, `active_channels_mask` as float Parameters), so PyTorch names the keys as
  in Gator's files; the dict around it is gator/main.py `save_checkpoint`'s;
- the gate application: forward hooks on the out side's alias module, pre-hooks on the in side
  (ModulesChannelsGatingHooks), multiplying by the deterministic part of
  `ChannelsLogisticGatingMasked.forward`: active_channels_mask after `deactivate_channels`
  (gating_weights < 0 switched off), the stochastic sample left out.
"""
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from models.gator_nets import resnet56, vgg11_bn_small

NETS = Path(__file__).parent / "models" / "gator_nets.py"

MAX_REL_ERR = 1e-5


def _alias(net, conv_name):
    """The mapper's alias_map for a ResNet conv: its BN (`bn<i>` / `downsample.1`)."""
    if conv_name == "conv1":
        return "bn1"
    if conv_name.endswith("downsample.0"):
        return conv_name[:-1] + "1"
    head, _, conv = conv_name.rpartition(".")
    return f"{head}.bn{conv[4:]}"


def reference_hyper_edges(net, no_last_conv=False):
    """Gator's hyper-edges as [(module name, is_in), ...] lists, alias modules already applied
    for out sides (gate_wrapped_module.create_gating_modules uses alias_map.get((conv, side)))."""
    if hasattr(net, "layer1"):  # ResNetGatesModulesMapper.map_modules_inner
        edges = []
        inter = [("conv1", False)]
        num_layers = 4 if hasattr(net, "layer4") else 3
        for i in range(1, num_layers + 1):
            for j, block in enumerate(getattr(net, f"layer{i}").children()):
                prefix = f"layer{i}.{j}."
                inter.append((prefix + "conv1", True))
                is_bottleneck = isinstance(block, torchvision.models.resnet.Bottleneck)
                if j == 0 and (i > 1 or is_bottleneck):
                    inter.append((prefix + "downsample.0", True))
                    edges.append(inter)
                    inter = [(prefix + "downsample.0", False)]
                edges.append([(prefix + "conv1", False), (prefix + "conv2", True)])
                if not is_bottleneck:
                    inter.append((prefix + "conv2", False))
                else:
                    edges.append([(prefix + "conv2", False), (prefix + "conv3", True)])
                    inter.append((prefix + "conv3", False))
        if not no_last_conv:
            edges.append(inter)
        return [[(_alias(net, m) if not is_in else m, is_in) for m, is_in in e] for e in edges]
    # NaiveSequentialGatesModulesMapper.map_modules_inner
    edges, last_conv, alias = [], None, {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if last_conv is not None:
                edges.append([(last_conv, False), (name, True)])
            last_conv = name
        if isinstance(m, nn.BatchNorm2d):
            alias[last_conv] = name
    if not no_last_conv:
        edges.append([(last_conv, False)])
    return [[(alias.get(m, m) if not is_in else m, is_in) for m, is_in in e] for e in edges]


# ResNet-18's order read off ResNetGatesModulesMapper.map_modules_inner by hand: layer1 has no
# downsample, so the stem's edge (shared by layer1) is appended only when layer2.0's downsample
# is met, after layer1's two inner edges.
RESNET18_ORDER = [
    "layer1.0.conv1->conv2", "layer1.1.conv1->conv2", "stem+layer1",
    "layer2.0.conv1->conv2", "layer2.1.conv1->conv2", "layer2",
    "layer3.0.conv1->conv2", "layer3.1.conv1->conv2", "layer3",
    "layer4.0.conv1->conv2", "layer4.1.conv1->conv2", "layer4",
]


def _edge_label(edge):
    first = edge[0][0]
    if first == "bn1":
        return "stem+layer1"
    if first.endswith("downsample.1"):
        return first.split(".")[0]
    block = first.rsplit(".", 1)[0]
    return f"{block}.conv{first[-1]}->conv{int(first[-1]) + 1}"


class _GatingModule(nn.Module):
    def __init__(self, channels, weights, active):
        super().__init__()
        self.gating_weights = nn.Parameter(weights)
        self.active_channels_mask = nn.Parameter(active, requires_grad=False)

    def keep(self):
        """ChannelsLogisticGatingMasked: deactivate_channels() then the permanent mask."""
        return self.active_channels_mask.masked_fill(self.gating_weights < 0, 0)


class _Hook(nn.Module):
    def __init__(self, gating_module):
        super().__init__()
        self.gating_module = gating_module


class GatorWrapped(nn.Module):
    def __init__(self, net, edges, gen, keep=0.6):
        super().__init__()
        self.net = net
        hooks, modules = [], dict(net.named_modules())
        for edge in edges:
            channels = self._channels(modules, edge[0])
            w = torch.randn(channels, generator=gen) + float(torch.special.logit(torch.tensor(keep)))
            active = (torch.rand(channels, generator=gen) < 0.9).float()
            active[0] = 1.0
            w[0] = abs(w[0]) + 0.1  # every edge keeps a channel
            hooks.append(_Hook(_GatingModule(channels, w, active)))
        self.forward_hooks = nn.ModuleList(hooks)
        for hook, edge in zip(hooks, edges):
            g = hook.gating_module
            for name, is_in in edge:
                mod = modules[name]
                if is_in:
                    mod.register_forward_pre_hook(lambda m, i, g=g: (i[0] * g.keep().view(1, -1, *[1] * (i[0].dim() - 2)),))
                else:
                    mod.register_forward_hook(lambda m, i, o, g=g: o * g.keep().view(1, -1, 1, 1))

    @staticmethod
    def _channels(modules, side):
        name, is_in = side
        m = modules[name]
        if is_in:
            return m.in_channels
        return m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_channels


def _randomize(net, gen):
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
    return net.eval()


def _write(tmp_path, net, no_last_conv=False, seed=0, ddp=False):
    gen = torch.Generator().manual_seed(seed)
    _randomize(net, gen)
    wrapped = GatorWrapped(net, reference_hyper_edges(net, no_last_conv), gen).eval()
    state = wrapped.state_dict()
    if ddp:
        state = {f"module.{k}": v for k, v in state.items()}
    ckpt = tmp_path / "gator.pth.tar"
    torch.save({"epoch": 10, "arch": type(net).__name__, "state_dict": state, "best_acc1": 70.0,
                "optimizer": {"state": {}, "param_groups": []}}, ckpt)
    return ckpt, wrapped


def _export_and_compare(cli, tmp_path, ckpt, wrapped, model, shape, *extra):
    out = tmp_path / "m.onnx"
    code, stdout, err = cli("export", ckpt, "--model", model, "--input-shape", ",".join(map(str, shape)),
                            "-o", out, *extra)
    assert code == 0, err
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wrapped.net(x).numpy()
    got = _run(out, x)
    assert np.isfinite(got).all() and np.isfinite(expected).all()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= MAX_REL_ERR, rel
    return stdout


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_resnet18_order_is_gators_by_hand():
    edges = reference_hyper_edges(torchvision.models.resnet18())
    assert [_edge_label(e) for e in edges] == RESNET18_ORDER


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_gator_resnet_exports_equal_to_gators_gated_network(tmp_path, cli, arch):
    net = getattr(torchvision.models, arch)()
    ckpt, wrapped = _write(tmp_path, net, seed=hash(arch) % 1000, ddp=arch == "resnet50")
    _export_and_compare(cli, tmp_path, ckpt, wrapped, f"torchvision.models:{arch}", (1, 3, 64, 64))


def test_importer_order_matches_the_reference_for_every_supported_depth():
    from gate2deploy.importers.gator import hyper_edges

    for net in [torchvision.models.resnet18(), torchvision.models.resnet101(), resnet56(),
                vgg11_bn_small()]:
        for nlc in (False, True):
            ref = reference_hyper_edges(net, nlc)
            got = hyper_edges(net, nlc)
            assert len(got) == len(ref)
            for r, g in zip(ref, got):
                assert sorted(m for m, is_in in r if not is_in) == sorted(g.out_modules)
                assert sorted(m for m, is_in in r if is_in) == sorted(set(g.in_modules) - {"fc"})


def test_gator_cifar_resnet56_with_no_last_conv(tmp_path, cli):
    """Gator's 3-stage CIFAR ResNet, trained with no_last_conv=True (one gate fewer): the count
    alone tells it, and stating it agrees; stating the opposite is refused with the flag named."""
    ckpt, wrapped = _write(tmp_path, resnet56(), no_last_conv=True, seed=5)
    _export_and_compare(cli, tmp_path, ckpt, wrapped, f"{NETS}:resnet56", (2, 3, 32, 32),
                        "--gator-no-last-conv", "true")
    code, out, err = cli("export", ckpt, "--model", f"{NETS}:resnet56", "--input-shape",
                         "1,3,32,32", "-o", tmp_path / "x.onnx", "--gator-no-last-conv", "false")
    assert code == 2 and "--gator-no-last-conv true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_gator_vgg_naive_sequential_order(tmp_path, cli):
    net = vgg11_bn_small()
    ckpt, wrapped = _write(tmp_path, net, seed=11)
    cfg = tmp_path / "gating_config.json"
    cfg.write_text('{"factor_type": "flop_factor", "criteria_weight": 1.0}')  # no_last_conv: the seed default
    _export_and_compare(cli, tmp_path, ckpt, wrapped, f"{NETS}:vgg11_bn_small", (1, 3, 32, 32),
                        "--gator-config", cfg)


def _edit_state(ckpt, fn):
    data = torch.load(ckpt, weights_only=True)
    fn(data["state_dict"])
    torch.save(data, ckpt)


@pytest.mark.parametrize("damage, message", [
    # 10 gates: ResNet-18 has 12 (no_last_conv false) or 11 (true)
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(("forward_hooks.10.", "forward_hooks.11."))],
     "has 10 gates; Gator's ResNet mapper gives ResNet 12 hyper-edges (no_last_conv false) or 11"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("forward_hooks.3.")], "gates [3] are missing"),
    (lambda sd: sd["forward_hooks.4.gating_module.active_channels_mask"].mul_(0.5),
     "gate 4: active_channels_mask holds values other than 0 and 1"),
    # a key naming gate 10**9: named in one line, without a list of every index up to it
    (lambda sd: sd.__setitem__("forward_hooks.1000000000.gating_module.gating_weights", torch.ones(4)),
     "gates [12, 13, 14, 15, 16] are missing"),
    (lambda sd: sd.__setitem__("forward_hooks.2.gating_module.gating_weights",
                               torch.complex(sd["forward_hooks.2.gating_module.gating_weights"].float(),
                                             torch.ones_like(sd["forward_hooks.2.gating_module.gating_weights"]))),
     "gate 2: its gating tensors hold a complex tensor"),
])
def test_damaged_gator_gates_are_one_line(tmp_path, cli, damage, message):
    ckpt, _ = _write(tmp_path, torchvision.models.resnet18(), seed=2)
    _edit_state(ckpt, damage)
    code, out, err = cli("export", ckpt, "--model", "torchvision.models:resnet18", "--input-shape", "1,3,64,64",
                         "-o", tmp_path / "x.onnx")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.onnx").exists()

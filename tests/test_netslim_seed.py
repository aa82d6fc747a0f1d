"""Network slimming (seed 000, Mayo's NetworkSlimmer) exported and compared with the network
as Mayo computes it, not with the importer's masks.

The expected masks come from `mayo_threshold` / `mayo_masks` below, written from
mayo/override/prune/netslim.py (`NetworkSlimmer._threshold`, `_global_threshold`,
`_updated_mask` with global_threshold=True, incremental=False) and applied where Mayo applies
them: the `activation` overrider of each conv layer (models/override/prune/netslim.yaml), i.e.
multiplying the layer's output after its BatchNorm and ReLU (ChannelPrunerBase._apply).
For ResNets, gate2deploy slims only the BatchNorms whose channels no residual add couples
(README, importers/netslim.py): the test masks exactly those, the first BN of each block.
"""
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models.cifar_nets import randomize_batchnorm, resnet20, vgg16_bn

CIFAR = Path(__file__).parent / "models" / "cifar_nets.py"


def mayo_threshold(values, density):
    """NetworkSlimmer._threshold: 0 for no values or when every channel stays active."""
    if not values:
        return 0
    num_active = math.ceil(len(values) * density)
    if num_active == len(values):
        return 0
    return sorted(values)[-num_active - 1]


def mayo_masks(bns, density):
    """_global_threshold over every slimmed layer's gamma (as float32 values, like
    session.run), then _updated_mask: gamma > threshold."""
    gammas = [bn.weight.detach().numpy() for bn in bns]
    threshold = mayo_threshold(sum((g.tolist() for g in gammas), []), density)
    return [torch.from_numpy(g > threshold) for g in gammas]


def _mask_after_relu(model, names, masks):
    """Mayo's activation overrider: multiply after BN + ReLU (ReLU(BN) here is computed in
    the hook, then masked, which is what the next layer reads)."""
    modules = dict(model.named_modules())
    for name, mask in zip(names, masks):
        modules[name].register_forward_hook(
            lambda m, i, o, mask=mask: torch.relu(o) * mask.float().view(1, -1, 1, 1))


def _export_and_compare(cli, tmp_path, ckpt, reference, model_spec, shape, density, *extra):
    out = tmp_path / "m.onnx"
    code, _, err = cli("export", ckpt, "--model", model_spec, "--netslim-density", density,
                       "--input-shape", ",".join(map(str, shape)), "-o", out, *extra)
    assert code == 0, err
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.isfinite(got).all() and np.isfinite(expected).all()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-5, rel
    return out


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_netslim_vgg_equals_mayos_slimmed_network(tmp_path, cli, density):
    """density 1.0 is Mayo's default: _threshold returns 0, so gamma <= 0 channels still go."""
    model = randomize_batchnorm(vgg16_bn(width=0.25), seed=4)
    ckpt = tmp_path / "vgg.pt"
    torch.save({"model_state_dict": model.state_dict()}, ckpt)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    modules = dict(model.named_modules())
    masks = mayo_masks([modules[n] for n in names], density)
    assert 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)
    # the model's own ReLU then sees masked non-negative values: relu(relu(y) * m) = relu(y) * m
    _mask_after_relu(model, names, masks)
    out = _export_and_compare(cli, tmp_path, ckpt, model, f"{CIFAR}:vgg16_bn", (2, 3, 32, 32), density,
                              "--model-kwargs", '{"width": 0.25}', "--physical-widths", "exact")
    import onnx
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    assert len(convs) == len(masks)  # every conv kept, each exactly as wide as Mayo keeps


def test_netslim_resnet_equals_mayos_rule_on_uncoupled_layers(tmp_path, cli):
    model = randomize_batchnorm(resnet20(), seed=6)
    ckpt = tmp_path / "r20.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    names = [n for n, m in model.named_modules() if n.startswith("layers.") and n.endswith(".bn1")]
    modules = dict(model.named_modules())
    masks = mayo_masks([modules[n] for n in names], 0.4)
    _mask_after_relu(model, names, masks)
    _export_and_compare(cli, tmp_path, ckpt, model, f"{CIFAR}:resnet20", (1, 3, 32, 32), 0.4)


def test_overriders_update_shares_the_first_global_slimmers_threshold():
    """Slimmers of other densities and flags (--mayo-overriders-update): Mayo's estimator
    semantics written out from mayo/override/prune/netslim.py. Every slimmer registers its
    gamma; session.overriders_update calls update() in layer order; the first global one
    (`_global_threshold`, estimator.max_len(gamma) > 0) pools every should_update slimmer's
    gamma (masked by the stored mask when *its* incremental is set), takes _threshold with
    *its* density, flushes the gammas and stores the threshold; the later ones find no gammas
    and reuse it. `_updated_mask`: gamma > threshold, and with the stored mask if incremental."""
    from gate2deploy.importers.mayo import _recompute_slim_masks
    from gate2deploy.nn import ChannelMask

    rng = np.random.default_rng(0)
    specs = [("a", 0.5, False), ("b", 0.25, True), ("c", 0.9, False)]  # (layer, density, incremental)
    slimmers = []
    for layer, density, incremental in specs:
        gamma = rng.standard_normal(16)
        stored = rng.random(16) < 0.7
        slimmers.append({"layer": layer, "module": ChannelMask(torch.ones(16)), "stored": stored.copy(),
                         "gamma": gamma, "enable": True, "density": density, "should_update": True,
                         "global_threshold": True, "incremental": incremental})
    registered = {s["layer"]: (s["gamma"].copy(), s["stored"].copy()) for s in slimmers}  # the estimator
    stored_threshold, expected = None, {}
    for layer, density, incremental in specs:
        gamma, mask = registered[layer]
        if stored_threshold is None:  # the first update(): gammas still registered
            values = []
            for g, m in registered.values():
                values += (g[m] if incremental else g).tolist()
            stored_threshold = mayo_threshold(values, density)
        new = gamma > stored_threshold
        expected[layer] = (new & mask) if incremental else new
    thresholds = _recompute_slim_masks(slimmers)
    assert set(thresholds.values()) == {stored_threshold}
    for s in slimmers:
        np.testing.assert_array_equal(s["module"].mask.numpy().astype(bool), expected[s["layer"]], err_msg=s["layer"])
    # the densities differ, so a per-slimmer threshold would have kept other channels
    assert mayo_threshold(np.concatenate([s["gamma"] for s in slimmers]).tolist(), 0.25) != stored_threshold

"""sensAI (seed 004): group models written as sensAI writes them -> one ONNX model equal to
the seed's grouped evaluation (gate2deploy/importers/sensai.py)."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import gate2deploy
from models.sensai_nets import ResNet, group_models
from test_bad_input import _assert_clean_failure

GROUPS5 = [[1, 3], [0, 2], [5, 4], [7, 6], [9, 8]]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """PyTorch's CPU convolutions crawl with 2 threads on this shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seed_grouped_eval(models, groups, x):
    """evaluate.py GroupedModel.forward, written anew: multi-class groups
    softmax(model(x))[:, 1:] concatenated; single-class groups (args.bce) the logits
    model(x)[:, 0] stacked and softmaxed across models; then mm with eye(n)[perm], perm the
    groups' classes concatenated. The seed `.squeeze()`s the stacked logits, which breaks
    batch 1; the (B, N) shape is kept here instead (the same numbers at B > 1)."""
    perm = [c for g in groups for c in g]
    eye = torch.eye(len(perm))[perm]
    with torch.no_grad():
        if all(len(g) == 1 for g in groups):
            out = torch.softmax(torch.stack([m(x)[:, 0] for m in models], dim=1), dim=1)
        else:
            out = torch.cat([torch.softmax(m(x), dim=1)[:, 1:] for m in models], 1)
        return torch.mm(out, eye).numpy()


def save_group_models(folder, arch, models, groups, npy=True):
    """As cifar_group.py saves them: torch.save(model) to <arch>_<g>_pruned_group_model.pth,
    and the grouping as grouping_config.npy (prune_and_get_model.py main)."""
    (folder / arch).mkdir(parents=True)
    files = []
    for g, m in enumerate(models):
        files.append(folder / arch / f"{arch}_{g}_pruned_group_model.pth")
        torch.save(m, files[-1])
    if npy:
        grouping = folder / "grouping_config.npy"
        np.save(grouping, np.array(groups))
    else:
        grouping = folder / "grouping.json"
        grouping.write_text(json.dumps(groups))
    return folder / arch, files, grouping


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def export(cli, ckpts, grouping, out, batch, *extra):
    return cli("export", *ckpts, "--sensai-grouping", grouping, "--target", "onnx", "-o", out,
               "--input-shape", f"{batch},3,32,32", "--trust-pickle", "--report", f"{out}.json", *extra)


def conv_groups(path):
    return [next((a.i for a in n.attribute if a.name == "group"), 1)
            for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("batch", [1, 8])
def test_vgg_folder_fused_matches_seed_evaluation(tmp_path, cli, batch):
    models = group_models("vgg", GROUPS5, 10)
    folder, _, grouping = save_group_models(tmp_path, "vgg19_bn", models, GROUPS5)
    out = tmp_path / "m.onnx"
    code, stdout, err = export(cli, [folder], grouping, out, batch, "--sensai-form", "fused")
    assert code == 0, err
    x = torch.randn(batch, 3, 32, 32)
    got = run_onnx(out, x)
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, seed_grouped_eval(models, GROUPS5, x), rtol=0, atol=1e-5)
    plan = json.loads((tmp_path / "m.onnx.json").read_text())["mask_sources"]["sensai"]
    assert plan["fused"] == [[0, 1, 2, 3, 4]] and plan["branches"] == [] and plan["mode"] == "multi-class"
    # one model, not five: the first conv dense, every later conv (and the head) group=5
    groups = conv_groups(out)
    assert len(groups) == 6 and groups[0] == 1 and set(groups[1:]) == {5}, groups


def test_no_fuse_flag_gives_branches(tmp_path, cli):
    models = group_models("vgg", GROUPS5, 10, seed=11)
    folder, _, grouping = save_group_models(tmp_path, "vgg19_bn", models, GROUPS5)
    out = tmp_path / "m.onnx"
    code, _, err = export(cli, [folder], grouping, out, 2, "--sensai-no-fuse")
    assert code == 0, err
    plan = json.loads((tmp_path / "m.onnx.json").read_text())["mask_sources"]["sensai"]
    assert plan["fused"] == [] and plan["branches"] == [0, 1, 2, 3, 4]
    assert set(conv_groups(out)) == {1} and len(conv_groups(out)) == 5 * 5  # five convs per group
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(run_onnx(out, x), seed_grouped_eval(models, GROUPS5, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
def test_single_class_groups_any_batch(tmp_path, cli, batch):
    """Ten one-class groups with one-logit heads (the seed's bce mode), given as files in
    shuffled order (paired by the group index in their names) and a JSON grouping."""
    groups = [[c] for c in (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)]
    models = group_models("vgg", groups, 10, seed=2)
    _, files, grouping = save_group_models(tmp_path, "vgg19_bn", models, groups, npy=False)
    out = tmp_path / "m.onnx"
    code, _, err = export(cli, files[::-1], grouping, out, batch)
    assert code == 0, err
    x = torch.randn(batch, 3, 32, 32)
    got = run_onnx(out, x)
    np.testing.assert_allclose(got, seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "m.onnx.json").read_text())["mask_sources"]["sensai"]["mode"] == "single-logit"


def test_resnet_uneven_groups_python_api(tmp_path):
    """Bottleneck ResNet groups of different sizes (JSON), through gate2deploy.compile."""
    groups = [[1, 3, 0], [2, 5, 4, 8], [7, 6, 9]]
    models = group_models("resnet", groups, 10, seed=3, depth=11)
    _, files, grouping = save_group_models(tmp_path, "resnet110", models, groups, npy=False)
    compiled = gate2deploy.compile([str(f) for f in files], input_shape="2,3,32,32", target="onnx",
                                   sensai_grouping=str(grouping), trust_pickle=True, sensai_form="fused")
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(compiled.run(x)[0], seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)
    assert compiled.report["mask_sources"]["sensai"]["fused"] == [[0, 1, 2]]


def test_different_structures_run_as_branches(tmp_path, cli):
    groups = [[0, 1], [2, 3], [4, 5]]
    vgg = group_models("vgg", groups, 6, seed=4)
    res = group_models("resnet", groups, 6, seed=5, depth=11)
    models = [vgg[0], res[1], vgg[2]]
    folder, _, grouping = save_group_models(tmp_path, "mixed", models, groups)
    out = tmp_path / "m.onnx"
    code, _, err = export(cli, [folder], grouping, out, 1, "--sensai-form", "fused")
    assert code == 0, err
    assert "branches" in err  # the front end says which groups were not fused
    plan = json.loads((tmp_path / "m.onnx.json").read_text())["mask_sources"]["sensai"]
    assert plan["fused"] == [[0, 2]] and plan["branches"] == [1], plan
    x = torch.randn(1, 3, 32, 32)
    np.testing.assert_allclose(run_onnx(out, x), seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)


class TestBadInput:
    @pytest.fixture
    def saved(self, tmp_path):
        models = group_models("vgg", GROUPS5, 10, seed=6)
        return save_group_models(tmp_path, "vgg19_bn", models, GROUPS5)

    @pytest.fixture(autouse=True)
    def _out(self, tmp_path):
        (tmp_path / "out").mkdir()

    def _grouping(self, tmp_path, groups):
        path = tmp_path / "vgg19_bn" / "bad.json"
        path.write_text(json.dumps(groups))
        return path

    def test_class_twice(self, tmp_path, cli, saved):
        folder, _, _ = saved
        bad = self._grouping(tmp_path, [[1, 3], [0, 2], [5, 4], [7, 6], [9, 1]])
        _assert_clean_failure(export(cli, [folder], bad, tmp_path / "out" / "m.onnx", 1), tmp_path / "out",
                              "class 1", "exactly one group")

    def test_class_missing(self, tmp_path, cli, saved):
        folder, _, _ = saved
        bad = self._grouping(tmp_path, [[1, 3], [0, 2], [5, 4], [7, 6], [9, 10]])
        _assert_clean_failure(export(cli, [folder], bad, tmp_path / "out" / "m.onnx", 1), tmp_path / "out", "class 8 missing")

    def test_head_does_not_match_group(self, tmp_path, cli, saved):
        folder, _, _ = saved
        bad = self._grouping(tmp_path, [[1, 3], [0, 2], [5, 4], [7, 6, 9], [8]])
        _assert_clean_failure(export(cli, [folder], bad, tmp_path / "out" / "m.onnx", 1), tmp_path / "out",
                              "group 3", "3 outputs", "needs 4")

    def test_input_shape_mismatch(self, tmp_path, cli, saved):
        folder, _, grouping = saved
        result = cli("export", folder, "--sensai-grouping", grouping, "-o", tmp_path / "out" / "m.onnx",
                     "--input-shape", "1,1,32,32", "--trust-pickle")
        _assert_clean_failure(result, tmp_path / "out", "group 0", "does not run on input shape")

    def test_models_of_different_inputs(self, tmp_path, cli):
        groups = [[0, 1], [2, 3]]
        models = group_models("vgg", groups, 4, seed=7)
        gray = group_models("vgg", groups, 4, seed=7)[1]
        gray.features[0].weight.data = gray.features[0].weight.data[:, :1]  # a 1-channel input model
        gray.features[0].in_channels = 1
        folder, _, grouping = save_group_models(tmp_path, "vgg", [models[0], gray], groups)
        _assert_clean_failure(export(cli, [folder], grouping, tmp_path / "out" / "m.onnx", 1), tmp_path / "out",
                              "group 1", "does not run on input shape")

    def test_missing_group_file(self, tmp_path, cli, saved):
        folder, files, grouping = saved
        files[2].unlink()
        _assert_clean_failure(export(cli, [folder], grouping, tmp_path / "out" / "m.onnx", 1), tmp_path / "out",
                              "no model for group 2")

    def test_pickle_needs_trust(self, tmp_path, cli, saved):
        folder, _, grouping = saved
        result = cli("export", folder, "--sensai-grouping", grouping, "-o", tmp_path / "out" / "m.onnx",
                     "--input-shape", "1,3,32,32")
        _assert_clean_failure(result, tmp_path / "out", "--trust-pickle")

    def test_several_checkpoints_need_grouping(self, tmp_path, cli, saved):
        _, files, _ = saved
        result = cli("export", *files[:2], "-o", tmp_path / "out" / "m.onnx", "--input-shape", "1,3,32,32", "--trust-pickle")
        _assert_clean_failure(result, tmp_path / "out", "--sensai-grouping")

    def test_grouping_not_integers(self, tmp_path, cli, saved):
        folder, _, _ = saved
        bad = tmp_path / "g.npy"
        np.save(bad, np.zeros((5, 2), dtype=np.float32))
        _assert_clean_failure(export(cli, [folder], bad, tmp_path / "out" / "m.onnx", 1), tmp_path / "out", "integer array")


def test_fusion_pads_groups_exactly():
    """Groups pruned to different widths: the fused model's logits are each group's own."""
    from gate2deploy.importers.sensai import fuse_groups

    models = group_models("resnet", [[0, 1]] * 3, 2, seed=8, depth=11)
    widths = {tuple(m.layer1[0].conv1.weight.shape[:1]) for m in models}
    assert len(widths) > 1  # the padding is exercised
    x = torch.randn(3, 3, 32, 32)
    fused, why = fuse_groups(models, x)
    assert fused is not None, why
    with torch.no_grad():
        out = fused(x).reshape(3, 3, -1)
        for g, m in enumerate(models):
            np.testing.assert_allclose(out[:, g].numpy(), m(x).numpy(), rtol=1e-5, atol=1e-5)
    assert isinstance(models[0], ResNet)


def test_fused_grouped_convs_run_blocked_in_onnx_runtime(tmp_path):
    """Groups narrower than one NCHWc block (a bottleneck ResNet's first stage pruned to 13-15
    channels): every grouped conv of the fused model must be one ONNX Runtime runs in its
    blocked layout. The judge is ONNX Runtime's own layout transformer (the optimized graph it
    writes), not the fusion's width rule: MLAS runs a grouped conv blocked only with whole
    blocks per group, and fell back to im2col with groups rounded to 4 (importers/sensai.py
    `_block_width`)."""
    from gate2deploy.importers.sensai import grouped_model

    groups = [[0, 1], [2, 3], [4, 5]]
    models = group_models("resnet", groups, 6, seed=32, depth=11)
    narrow = [m.layer1[0].conv1.out_channels for m in models]
    assert max(narrow) < 16 and any(c % 8 for c in narrow), narrow  # below a block, ragged
    x = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, groups, x, form="fused")
    assert gm.plan["form"] == "fused" and gm.plan["fused"] == [[0, 1, 2]]
    compiled = gate2deploy.compile(gm, x, target="onnx")
    np.testing.assert_allclose(compiled.run(x)[0], seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(compiled.onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    if not any(n.domain == "com.microsoft.nchwc" for n in optimized.graph.node):
        pytest.skip("ONNX Runtime uses no NCHWc kernels on this CPU")

    def group(node):
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    # the heads (Linear layers, a grouped 1x1 conv on 1x1 maps) keep their rows: the logits
    heads = [f"/{name}/" for name, m in models[0].named_modules() if isinstance(m, torch.nn.Linear)]
    grouped = [n for n in optimized.graph.node if "Conv" in n.op_type and group(n) > 1
               and not any(h in n.name for h in heads)]
    assert len(grouped) >= 6, [n.name for n in grouped]  # the blocks' convs
    unblocked = [f"{n.op_type} {n.name}" for n in grouped if n.domain != "com.microsoft.nchwc"]
    assert not unblocked, unblocked


def seed_apoz_candidates(model, batches):
    """apoz_policy.py, written anew: hooks on every ReLU (call order); per batch
    apoz = 100 * mean over (N, H, W) of |a| <= 0.005 and avg = mean |a|; both averaged over the
    batches; candidates = {apoz > 73} minus {avg >= 0.01} (generate_pruned_candidates)."""
    sums = []

    def hook(module, inputs, output):
        a = output.abs()
        stats = ((a <= 0.005).float().mean(dim=(0, 2, 3)) * 100, a.mean(dim=(0, 2, 3)))
        if len(sums) <= hook.k:
            sums.append([torch.zeros_like(s) for s in stats])
        for acc, s in zip(sums[hook.k], stats):
            acc += s
        hook.k += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        for x in batches:
            hook.k = 0
            model(x)
    for h in handles:
        h.remove()
    out = []
    for apoz, avg in sums:
        apoz, avg = apoz / len(batches), avg / len(batches)
        out.append(sorted(set(torch.nonzero(apoz > 73).flatten().tolist())
                          - set(torch.nonzero(avg >= 0.01).flatten().tolist())))
    return out


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_sensai_prune_then_export(tmp_path, cli, arch):
    import copy

    from models.sensai_nets import VGG, prune_resnet, prune_vgg, randomize

    base = randomize(VGG(num_classes=6) if arch == "vgg" else ResNet(depth=11, num_classes=6), seed=9)
    prune, head = (prune_vgg, "classifier.weight") if arch == "vgg" else (prune_resnet, "fc.weight")
    g = torch.Generator().manual_seed(9)
    for m in base.modules():  # channels that stay off, more or less, depending on the image
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data = torch.rand(m.num_features, generator=g) * 4 - 3.2
    groups = [[0, 3], [1, 4], [2, 5]]
    labels = np.arange(60) % 6
    images = (torch.randn(60, 3, 32, 32, generator=g) + torch.from_numpy(labels).float().view(-1, 1, 1, 1) * 0.4).numpy()
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "groups.npy", np.array(groups))
    torch.save(base, tmp_path / "base.pth")
    out = tmp_path / "pruned"
    code, stdout, err = cli("sensai-prune", tmp_path / "base.pth", "--trust-pickle", "--sensai-grouping",
                            tmp_path / "groups.npy", "--sample-inputs", tmp_path / "x.npy", "--labels",
                            tmp_path / "y.npy", "--batch-size", "7", "--arch", "vgg19_bn", "-o", out)
    assert code == 0, err
    expected_models, all_cands = [], []
    for gi, group in enumerate(groups):
        idx = np.nonzero(np.isin(labels, group))[0]
        batches = [torch.from_numpy(images[idx[i:i + 7]]) for i in range(0, len(idx), 7)]
        cands = seed_apoz_candidates(base, batches)
        all_cands.append(cands)
        expected = prune(copy.deepcopy(base), cands, group)
        expected_models.append(expected)
        got = torch.load(out / "vgg19_bn" / f"vgg19_bn_{gi}_pruned_model.pth", weights_only=False)
        want_sd, got_sd = expected.state_dict(), got.state_dict()
        assert want_sd.keys() == got_sd.keys()
        for k in want_sd:
            w, v = want_sd[k], got_sd[k]
            if k == head:  # row 0 is re-drawn at random, as in the seed
                w, v = w[1:], v[1:]
            assert w.shape == v.shape and torch.equal(w, v), k
    assert any(any(c) for c in all_cands[0]) and all_cands[0] != all_cands[1]  # the rule did something
    code, _, err = export(cli, [out / "vgg19_bn"], out / "grouping_config.npy", tmp_path / "m.onnx", 1)
    assert code == 0, err
    models = [torch.load(out / "vgg19_bn" / f"vgg19_bn_{gi}_pruned_model.pth", weights_only=False) for gi in range(3)]
    x = torch.randn(1, 3, 32, 32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), seed_grouped_eval(models, groups, x), atol=1e-5)


def test_sensai_prune_bad_labels(tmp_path, cli):
    from models.sensai_nets import VGG

    torch.save(VGG(num_classes=4), tmp_path / "base.pth")
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 32, 32), np.float32))
    np.save(tmp_path / "y.npy", np.arange(7) % 4)
    (tmp_path / "g.json").write_text("[[0, 1], [2, 3]]")
    (tmp_path / "out").mkdir()
    result = cli("sensai-prune", tmp_path / "base.pth", "--trust-pickle", "--sensai-grouping", tmp_path / "g.json",
                 "--sample-inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "-o", tmp_path / "out" / "p")
    _assert_clean_failure(result, tmp_path / "out", "8 images but 7 labels")
    assert not (tmp_path / "out" / "p").exists()


class _FixedWidth(torch.nn.Module):
    """A forward that is not width-agnostic: channel 0 (by number) is subtracted from all."""

    def __init__(self, rows):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, rows)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc((h - h[:, :1]).mean(dim=(2, 3)))


def test_forward_not_width_agnostic_falls_back_to_branches():
    from gate2deploy.importers.sensai import grouped_model

    groups = [[0, 2], [1, 3]]
    models = [_FixedWidth(3).eval(), _FixedWidth(3).eval()]
    x = torch.randn(2, 3, 32, 32)
    gm = grouped_model(models, groups, x)
    assert gm.plan["fused"] == [] and gm.plan["branches"] == [0, 1]
    assert "width-agnostic" in gm.plan["not_fused_because"][0] and len(gm.plan["not_fused_because"]) == 1
    assert gm.plan["form"] == "branches" and list(gm.plan["candidates"]) == ["branches"]
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), seed_grouped_eval(models, groups, x), rtol=0, atol=1e-6)


def split_everything(modules, example, threads, **timing):
    """A timer for grouped_model that makes every layer faster per group, and each whole form
    as fast as listed in FORM_MS (so the choice is known in advance)."""
    if set(modules) == {"grouped", "split"}:
        return {"grouped": 2.0, "split": 1.0}, ""
    return {k: FORM_MS[k] for k in modules}, ""


FORM_MS = {"fused": 3.0, "hybrid": 1.0, "padded": 2.5, "branches": 2.0}


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_hybrid_form_matches_seed_evaluation(tmp_path, arch):
    """Every grouped conv split back into the groups' own convs (+ their own BN): the exported
    model still equals the seed's grouped evaluation at batch 1 and 8."""
    from gate2deploy.importers.sensai import SplitConv, grouped_model

    groups = [[0, 1], [2, 3], [4, 5]]
    models = (group_models("vgg", groups, 6, seed=21) if arch == "vgg" else
              group_models("resnet", groups, 6, seed=22, depth=11))
    x1 = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, groups, x1, form="hybrid", timer=split_everything)
    assert gm.plan["form"] == "hybrid" and gm.plan["hybrid_split_layers"], gm.plan
    splits = [m for m in gm.modules() if isinstance(m, SplitConv)]
    assert len(splits) == len(gm.plan["hybrid_split_layers"])
    compiled = gate2deploy.compile(gm, x1, target="onnx")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        np.testing.assert_allclose(compiled.run(x)[0], seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)


def conv_widths(model: onnx.ModelProto, skip: list[str]) -> list[int]:
    """Every Conv's output channel count (from its weight initializer), except nodes whose
    name contains one of `skip`."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [dims[n.input[1]][0] for n in model.graph.node
            if n.op_type == "Conv" and not any(s in n.name for s in skip)]


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_padded_form_rounds_widths_to_blocks_and_matches_seed_evaluation(arch):
    """--sensai-form padded: every group its own branch, every conv's width a whole NCHWc
    block (passes/choose_widths.py BLOCK; 4 below a block), the group models' own widths
    ragged; the export equals the seed's grouped evaluation at batch 1 and 8."""
    from gate2deploy.importers.sensai import grouped_model
    from gate2deploy.passes.choose_widths import BLOCK

    groups = [[0, 1], [2, 3], [4, 5]]
    models = (group_models("vgg", groups, 6, seed=26) if arch == "vgg" else
              group_models("resnet", groups, 6, seed=27, depth=11))
    own = [m.out_channels for model in models for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c % 4 for c in own)  # the fixture's pruned widths are ragged
    x1 = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, groups, x1, form="padded")
    assert gm.plan["form"] == "padded" and gm.plan["padded"] == [0, 1, 2] and gm.plan["fused"] == []
    compiled = gate2deploy.compile(gm, x1, target="onnx")
    # the heads (Linear layers, exported as 1x1 convs) keep their rows: the logits
    heads = {name for name, m in models[0].named_modules() if isinstance(m, torch.nn.Linear)}
    widths = conv_widths(compiled.onnx_model, skip=[f"/{h}/" for h in heads])
    assert len(widths) == len(own)  # every group's convs
    assert all(w % (BLOCK if w >= BLOCK else 4) == 0 for w in widths), widths
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        np.testing.assert_allclose(compiled.run(x)[0], seed_grouped_eval(models, groups, x), rtol=0, atol=1e-5)


class _Depthwise(torch.nn.Module):
    """A model with a depthwise conv, which has no padded (fused) form: width 6 is ragged."""

    def __init__(self, rows):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = torch.nn.Linear(6, rows)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).mean(dim=(2, 3)))


def test_padded_form_falls_back_to_branches_when_no_group_pads():
    from gate2deploy.importers.sensai import grouped_model

    groups = [[0, 2], [1, 3]]
    models = [_Depthwise(3).eval(), _Depthwise(3).eval()]
    x = torch.randn(2, 3, 32, 32)
    gm = grouped_model(models, groups, x, form="padded")
    plan = gm.plan
    assert plan["form"] == "branches" and plan["padded"] == [] and len(plan["not_padded_because"]) == 2
    assert any("form padded not available (group 0: grouped convolutions" in n for n in plan["not_fused_because"])
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), seed_grouped_eval(models, groups, x), rtol=0, atol=1e-6)


def test_auto_keeps_padded_when_it_times_fastest():
    from gate2deploy.importers.sensai import grouped_model

    models = group_models("vgg", GROUPS5, 10, seed=28)
    x = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, GROUPS5, x, timer=lambda modules, *a, **k: (
        {"grouped": 1.0, "split": 2.0} if set(modules) == {"grouped", "split"} else
        {k: (0.5 if k == "padded" else 1.0) for k in modules}, ""))
    assert gm.plan["form"] == "padded" and gm.plan["padded"] == list(range(len(GROUPS5)))
    assert gm.plan["candidates"]["padded"]["macs"] > gm.plan["candidates"]["branches"]["macs"]
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), seed_grouped_eval(models, GROUPS5, x), rtol=0, atol=1e-5)


def test_auto_keeps_the_fastest_form_and_reports_timings():
    from gate2deploy.importers.sensai import grouped_model

    models = group_models("vgg", GROUPS5, 10, seed=23)
    x = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, GROUPS5, x, timer=split_everything)
    plan = gm.plan
    assert plan["form"] == "hybrid" and plan["chosen_by"].startswith("timing")
    assert {k: v["ms"] for k, v in plan["candidates"].items()} == FORM_MS
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), seed_grouped_eval(models, GROUPS5, x), rtol=0, atol=1e-5)


def dense_macs_small_vgg(model):
    """CFG_SMALL VGG on 32x32 (tests/models/sensai_nets.py): conv k spatial 32 / 2**k (a max
    pool after every conv), 3x3 kernels, and the classifier; from the layer widths alone."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    return (sum(c.in_channels * c.out_channels * 9 * (32 >> k) ** 2 for k, c in enumerate(convs))
            + model.classifier.in_features * model.classifier.out_features)


def test_auto_falls_back_to_fewest_macs_when_it_cannot_time():
    from gate2deploy.importers.sensai import grouped_model

    models = group_models("vgg", GROUPS5, 10, seed=24)
    x = torch.randn(1, 3, 32, 32)
    gm = grouped_model(models, GROUPS5, x, timer=lambda *a, **k: ({}, "no runtime"))
    plan = gm.plan
    assert plan["chosen_by"] == "MACs (timing failed: no runtime)"
    assert plan["candidates"]["branches"]["macs"] == sum(dense_macs_small_vgg(m) for m in models)
    assert plan["form"] == min(plan["candidates"], key=lambda k: plan["candidates"][k]["macs"])
    assert all("ms" not in v for v in plan["candidates"].values())


def test_no_fuse_contradicting_form(tmp_path, cli):
    models = group_models("vgg", GROUPS5, 10, seed=25)
    folder, _, grouping = save_group_models(tmp_path, "vgg19_bn", models, GROUPS5)
    (tmp_path / "out").mkdir()
    _assert_clean_failure(export(cli, [folder], grouping, tmp_path / "out" / "m.onnx", 1, "--sensai-no-fuse",
                                 "--sensai-form", "fused"), tmp_path / "out", "--sensai-no-fuse")


@pytest.mark.parametrize("case", ["arch_escape", "arch_slash", "arch_is_a_file", "file_model"])
def test_sensai_prune_bad_output_names_before_the_work(tmp_path, cli, case):
    """An --arch that is a path (`../x` wrote the group models outside -o), an -o whose <arch>
    entry is a file, or a model class from a file given by path (whole pickled modules cannot
    name it: torch.save failed after all the pruning): one line, nothing written."""
    from models.sensai_nets import VGG

    np.save(tmp_path / "x.npy", np.zeros((8, 3, 32, 32), np.float32))
    np.save(tmp_path / "y.npy", np.arange(8) % 4)
    (tmp_path / "g.json").write_text("[[0, 1], [2, 3]]")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--sensai-grouping", tmp_path / "g.json", "--sample-inputs", tmp_path / "x.npy",
            "--labels", tmp_path / "y.npy", "-o", out / "p"]
    if case == "file_model":
        torch.save(VGG(num_classes=4).state_dict(), tmp_path / "base.pth")
        model = ["--model", f"{Path(__file__).parent / 'models' / 'sensai_nets.py'}:VGG",
                 "--model-kwargs", '{"num_classes": 4}']
        result = cli("sensai-prune", tmp_path / "base.pth", *model, *args)
        _assert_clean_failure(result, out, "whole pickled modules")
    else:
        torch.save(VGG(num_classes=4), tmp_path / "base.pth")
        arch = {"arch_escape": "../escape", "arch_slash": "a/b", "arch_is_a_file": "vgg"}[case]
        if case == "arch_is_a_file":
            (out / "p").mkdir()
            (out / "p" / "vgg").write_text("x")
        result = cli("sensai-prune", tmp_path / "base.pth", "--trust-pickle", *args, "--arch", arch)
        _assert_clean_failure(result, out, "--arch" if case != "arch_is_a_file" else "is a file")
    assert not (tmp_path / "escape").exists() and not list(out.rglob("*.pth"))
    assert not list(out.rglob("grouping_config*"))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_auto_times_the_forms_as_the_export_target_makes_them(tmp_path, monkeypatch, target):
    """--sensai-form auto times each candidate through the export's target pipeline
    (api._sensai_form_timer): on `--target ort` the timed graphs hold the library's ops
    (StreamConv here, its size threshold lowered so the small VGG's 4x4 / 2x2 convs qualify),
    on `--target onnx` standard ops only; the plan says which pipeline timed them."""
    from gate2deploy.importers import sensai
    from gate2deploy.ops import DOMAIN
    from gate2deploy.passes import stream_weight_convs

    monkeypatch.setattr(stream_weight_convs, "MIN_WEIGHT_BYTES", 0)
    timed: dict[str, set[str]] = {}  # form -> the gate2deploy ops of the graph that was timed
    real = sensai.time_forms

    def spy(modules, example, threads, prepare=None, **kwargs):
        names = iter(modules)

        def recording(model):
            out = prepare(model) if prepare else model
            timed[next(names)] = {n.op_type for n in out.graph.node if n.domain == DOMAIN}
            return out
        return real(modules, example, threads, prepare=recording, **kwargs)

    monkeypatch.setattr(sensai, "time_forms", spy)
    models = group_models("vgg", GROUPS5, 10, seed=31)
    _, files, grouping = save_group_models(tmp_path, "vgg19", models, GROUPS5)
    extra = {"stream_convs": "on"} if target == "ort" else {}
    compiled = gate2deploy.compile([str(f) for f in files], input_shape="1,3,32,32", target=target,
                                   sensai_grouping=str(grouping), trust_pickle=True, **extra)
    plan = compiled.report["mask_sources"]["sensai"]
    assert plan["chosen_by"].startswith(f"timing: the --target {target} pipeline"), plan["chosen_by"]
    assert set(plan["candidates"]) <= set(timed) and len(plan["candidates"]) >= 3, (plan["candidates"], timed)
    for form in plan["candidates"]:
        assert ("StreamConv" in timed[form]) == (target == "ort"), (target, timed)
    x = torch.randn(1, 3, 32, 32)
    np.testing.assert_allclose(compiled.run(x)[0], seed_grouped_eval(models, GROUPS5, x), rtol=0, atol=1e-5)

"""The CLI bad-input corpus fuzzer (issue 17, "fuzzing in CI" (b)).

Files of every kind the CLI reads (.pt, .pth, .pt2 checkpoints, .npy/.npz/.pt sample and run
inputs, .onnx models, --model-kwargs / --gator-config / LUT / --channels JSON) are damaged
(truncated, bit-flipped, emptied, replaced by another kind's bytes, replaced by a hostile
pickle whose payload would create a marker file) and fed to export / info / profile / run.
Every call must end with exit 0, or exit 2 with exactly one stderr line and no traceback,
leave no file in its output folder unless it succeeded, and never run the payload
(`--target trt` without TensorRT exits 3 and keeps its TensorRT-ready files by design).

Seeded (GATE2DEPLOY_FUZZ_SEED, default 0) and bounded: every (kind, damage) pair once, then
random draws until GATE2DEPLOY_FUZZ_SECONDS (default 60) are spent. The CLI runs in-process
(gate2deploy.cli.main) so that no probe pays the interpreter's start-up.

    GATE2DEPLOY_FUZZ_SECONDS=1800 python -m pytest -q tests/test_cli_fuzz.py -s   # a long run
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import shutil
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

MARKER = "PAYLOAD_RAN"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling creates the marker file: proof that code ran
        return (open, (self.marker, "w"))


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ------------------------------------------------------------------ damages (bytes -> bytes)

def truncate(data: bytes, rng: random.Random, corpus) -> bytes:
    return data[:rng.randrange(0, max(1, len(data)))]


def bit_flip(data: bytes, rng: random.Random, corpus) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 4, 32))):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def empty(data, rng, corpus) -> bytes:
    return b""


def random_bytes(data, rng, corpus) -> bytes:
    return rng.randbytes(rng.choice((1, 16, 4096)))


def wrong_type(data, rng, corpus) -> bytes:
    return corpus.base[rng.choice(sorted(corpus.base))]


def hostile_pickle(data, rng, corpus) -> bytes:
    """A payload in one of the forms a loader might unpickle: torch.save's zip, its legacy
    stream, a bare pickle, a numpy object array, a .pt2 whose weight is a pickle."""
    marker = str(corpus.root / MARKER)
    form = rng.choice(("zip", "legacy", "raw", "npy", "pt2"))
    buf = io.BytesIO()
    if form == "zip":
        torch.save({"state_dict": Payload(marker)}, buf)
    elif form == "legacy":
        torch.save(Payload(marker), buf, _use_new_zipfile_serialization=False)
    elif form == "raw":
        buf.write(pickle.dumps(Payload(marker), protocol=2))
    elif form == "npy":
        np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    else:
        return corpus.pt2_with_pickled_weight()
    return buf.getvalue()


def json_damage(data, rng, corpus) -> bytes:
    """Valid JSON of the wrong structure or with hostile values."""
    return json.dumps(rng.choice([[], {}, None, 1e308, "x", {"format": None}, [[-1]], {"no_last_conv": "yes"},
                                  {"entries": {"a": {"ms": -1}}}, {"edges": [1e30]}, [float("inf")]]),
                      allow_nan=True).encode()


DAMAGES = {"truncated": truncate, "bit-flipped": bit_flip, "empty": empty, "random bytes": random_bytes,
           "wrong type": wrong_type, "hostile pickle": hostile_pickle}
JSON_DAMAGES = {**DAMAGES, "wrong JSON structure": json_damage}


# ------------------------------------------------------------------ the corpus

@dataclass
class Corpus:
    root: Path
    base: dict[str, bytes] = field(default_factory=dict)  # kind -> valid bytes

    def pt2_with_pickled_weight(self) -> bytes:
        with zipfile.ZipFile(io.BytesIO(self.base[".pt2"])) as z:
            entries = {n: z.read(n) for n in z.namelist()}
        cfg_name = next(n for n in entries if n.endswith("data/weights/model_weights_config.json"))
        cfg = json.loads(entries[cfg_name])
        meta = next(iter(cfg["config"].values()))
        meta["use_pickle"] = True
        entries[cfg_name] = json.dumps(cfg).encode()
        payload = io.BytesIO()
        torch.save(Payload(str(self.root / MARKER)), payload)
        entries[next(n for n in entries if n.endswith("data/weights/" + meta["path_name"]))] = payload.getvalue()
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            for n, d in entries.items():
                z.writestr(n, d)
        return out.getvalue()


def build_corpus(root: Path) -> Corpus:
    from gate2deploy.profiling.lut import FORMAT

    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.py").write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 8, 3, "
                                  "padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), "
                                  "nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    torch.manual_seed(0)
    net = tiny_net().eval()
    corpus = Corpus(root)

    def saved(obj, **kw) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        return buf.getvalue()

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    corpus.base[".pt"] = saved(net.state_dict())
    corpus.base[".pth"] = saved({"state_dict": net.state_dict(), "epoch": 3}, _use_new_zipfile_serialization=False)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), buf)
    corpus.base[".pt2"] = buf.getvalue()
    for kind, writer in ((".npy", lambda f: np.save(f, x)), (".npz", lambda f: np.savez(f, x=x))):
        buf = io.BytesIO()
        writer(buf)
        corpus.base[kind] = buf.getvalue()
    corpus.base["sample .pt"] = saved(torch.from_numpy(x))
    from gate2deploy.capture import capture
    corpus.base[".onnx"] = capture(net, torch.randn(1, 3, 8, 8)).SerializeToString()
    corpus.base["--model-kwargs json"] = b"{}"
    corpus.base["gator config json"] = json.dumps({"no_last_conv": False, "criteria_weight": 1.0}).encode()
    corpus.base["LUT json"] = json.dumps({"format": FORMAT, "entries": {}}).encode()
    corpus.base["channels json"] = b"[4, 8]"
    return corpus


# ------------------------------------------------------------------ probes

def _model(c):
    return ["--model", f"{c.root / 'tiny.py'}:net"]


SHAPE = ["--input-shape", "1,3,8,8"]
# kind -> (file suffix, commands using the file at {f}, the output folder at {o})
PROBES = {
    ".pt": (".pt", lambda c, f, o: [["export", f, *_model(c), *SHAPE, "-o", o / "m.onnx"],
                                     ["info", f, *_model(c), *SHAPE]]),
    ".pth": (".pth", lambda c, f, o: [["export", f, *_model(c), *SHAPE, "-o", o / "m.onnx", "--report", o / "r.json"],
                                       ["info", f, *_model(c), *SHAPE, "--out", o / "i.json"]]),
    ".pt2": (".pt2", lambda c, f, o: [["export", f, *SHAPE, "-o", o / "m.onnx"], ["info", f, *SHAPE],
                                       ["export", f, *SHAPE, "-o", o / "m.engine", "--target", "trt"]]),
    ".npy": (".npy", lambda c, f, o: [["export", c.root / "ok.pt", *_model(c), *SHAPE, "-o", o / "m.onnx",
                                        "--sample-inputs", f],
                                       ["run", c.root / "ok.onnx", "--input", f"input={f}", "--save-outputs",
                                        o / "y.npz"]]),
    ".npz": (".npz", lambda c, f, o: [["info", c.root / "ok.pt", *_model(c), *SHAPE, "--sample-inputs", f],
                                       ["run", c.root / "ok.onnx", "--input", f"input={f}"]]),
    "sample .pt": (".pt", lambda c, f, o: [["export", c.root / "ok.pt", *_model(c), *SHAPE, "-o", o / "m.onnx",
                                             "--sample-inputs", f]]),
    ".onnx": (".onnx", lambda c, f, o: [["run", f, "--input-shape", "1x3x8x8", "--save-outputs", o / "y.npz"]]),
    "--model-kwargs json": (".json", lambda c, f, o: [["export", c.root / "ok.pt", *_model(c), *SHAPE, "-o",
                                                       o / "m.onnx", "--model-kwargs", Path(f).read_bytes().decode(
                                                           "utf-8", "replace").replace("\0", "")]]),
    "gator config json": (".json", lambda c, f, o: [["export", c.root / "gator.pth.tar", "--model",
                                                     c.gator_model, "--input-shape", "1,3,32,32", "-o",
                                                     o / "m.onnx", "--gator-config", f, "--no-verify"]]),
    "LUT json": (".json", lambda c, f, o: [["profile", "--predict", f, "--channels", c.root / "channels.json"]]),
    "channels json": (".json", lambda c, f, o: [["profile", "--predict", c.root / "lut.json", "--channels", f]]),
}


@dataclass
class Outcome:
    tried: int = 0
    held: int = 0
    failures: list = field(default_factory=list)


def run_cli(argv) -> tuple[int, str, str]:
    from gate2deploy.cli import main

    import logging

    out, err = io.StringIO(), io.StringIO()
    # what libraries log goes to stderr outside pytest (logging's last resort); pytest's log
    # capture would hide it, so the probe collects it as stderr lines itself
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    with contextlib.ExitStack() as stack:
        stack.callback(logging.getLogger().removeHandler, handler)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a crash is a finding, recorded with its type
            code, err = 1, io.StringIO(f"Traceback (escaped {type(exc).__name__}: {exc})\n")
    return code, out.getvalue(), err.getvalue()


def check(corpus: Corpus, argv, out_dir: Path) -> str | None:
    """None if the call behaved; else what went wrong."""
    code, _, err = run_cli(argv)
    left = sorted(p.name for p in out_dir.iterdir())
    trt = "--target" in argv and "trt" in argv
    problems = []
    if (corpus.root / MARKER).exists():
        problems.append("the payload ran")
    if "Traceback" in err:
        problems.append("traceback")
    if code == 0:
        pass
    elif code == 3 and trt:
        if any(not n.endswith((".trt.onnx", ".trt.json")) for n in left):
            problems.append(f"left {left}")
    elif code == 2:
        if len(err.strip().splitlines()) != 1:
            problems.append(f"{len(err.strip().splitlines())} stderr lines")
        if left:
            problems.append(f"left {left}")
    else:
        problems.append(f"exit {code}")
    if any(n.endswith(".tmp") for n in left):
        problems.append("a .tmp file")
    return "; ".join(problems) + f" [{' '.join(map(str, argv))}] {err.strip()[:300]}" if problems else None


def fuzz(root: Path, seconds: float, seed: int = 0, log=print) -> dict[tuple[str, str], Outcome]:
    """Run the corpus; returns {(kind, damage): Outcome}."""
    corpus = build_corpus(root)
    _fixtures(corpus)
    rng = random.Random(seed)
    outcomes: dict[tuple[str, str], Outcome] = defaultdict(Outcome)
    pairs = [(kind, damage) for kind in PROBES
             for damage in (JSON_DAMAGES if "json" in kind else DAMAGES)]
    start = time.monotonic()
    i = 0
    while True:
        if i < len(pairs):
            kind, damage = pairs[i]
        else:
            if time.monotonic() - start > seconds:
                break
            kind = rng.choice(sorted(PROBES))
            damage = rng.choice(sorted(JSON_DAMAGES if "json" in kind else DAMAGES))
        i += 1
        suffix, commands = PROBES[kind]
        damages = JSON_DAMAGES if "json" in kind else DAMAGES
        data = damages[damage](corpus.base[kind], rng, corpus)
        f = root / f"fuzz{i}{suffix}"
        f.write_bytes(data)
        for argv in commands(corpus, f, _fresh(root / "out")):
            problem = check(corpus, argv, root / "out")
            o = outcomes[(kind, damage)]
            o.tried += 1
            o.held += problem is None
            if problem:
                o.failures.append(problem)
                (root / MARKER).unlink(missing_ok=True)
            _fresh(root / "out")
        f.unlink()
    return dict(outcomes)


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _fixtures(corpus: Corpus) -> None:
    """The valid files a probe needs beside the damaged one."""
    import sys

    root = corpus.root
    (root / "ok.pt").write_bytes(corpus.base[".pt"])
    (root / "ok.onnx").write_bytes(corpus.base[".onnx"])
    tests = Path(__file__).parent
    sys.path.insert(0, str(tests))
    from models.gator_nets import vgg11_bn_small
    from test_gator_seed import _write
    _write(root, vgg11_bn_small())
    corpus.gator_model = f"{tests / 'models' / 'gator_nets.py'}:vgg11_bn_small"
    # a LUT of the tiny model for the --channels probes (measured once, quickly)
    lut_dir = root / "lat"
    from gate2deploy.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["profile", "--model", f"{root / 'tiny.py'}:net", *SHAPE, "-o", str(lut_dir), "--repeats", "3",
                     "--warmup", "0", "--widths", "1", "--no-report", "--no-progress"]) == 0
    shutil.copy(lut_dir / "lut.json", root / "lut.json")
    (root / "channels.json").write_text("[4, 8]")


def table(outcomes: dict[tuple[str, str], Outcome]) -> str:
    """Per (kind, damage): probes tried and held; then a total."""
    rows = [f"{'kind':<22} {'damage':<22} {'tried':>6} {'held':>6}"]
    for (kind, damage), o in sorted(outcomes.items()):
        rows.append(f"{kind:<22} {damage:<22} {o.tried:>6} {o.held:>6}")
    tried = sum(o.tried for o in outcomes.values())
    held = sum(o.held for o in outcomes.values())
    rows.append(f"{'total':<22} {'':<22} {tried:>6} {held:>6}")
    return "\n".join(rows)

"""The profile's HTML report, opened in headless Chromium: the page parses, its tables are
there, and both PNG plots decode (the page's load script counts decoded images into
`data-images-loaded`). Chromium is Debian's `chromium`, installed by tools/test.sh."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gate2deploy.cli import main
from gate2deploy.profiling import lut as lutmod
from test_profile import FAST, TINY_NET

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (tools/test.sh installs Debian's chromium)")


def rendered_dom(html_path, profile_dir) -> str:
    profile_dir.mkdir()
    proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--dump-dom",
                           html_path.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    net = tmp_path_factory.mktemp("net") / "tiny.py"
    net.write_text(TINY_NET)
    out = tmp_path_factory.mktemp("prof") / "out"
    assert main(["profile", "--model", f"{net}:Net", "--input-shape", "1,3,32,32", "-o", str(out), *FAST]) == 0
    return out


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    dom = rendered_dom(report_dir / "report.html", tmp_path / "chromium")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images-expected="2"' in body
    assert 'data-images-loaded="2"' in body, body  # both PNGs decoded
    lut = lutmod.load_lut(report_dir / "lut.json")
    edges_table = re.search(r'<table id="edges">.*?</table>', dom, re.S).group(0)
    assert edges_table.count("<tr>") == 1 + len(lut["table"]["edges"])
    assert f"{lut['calibration']['whole_model_ms']:.3f} ms" in dom


def test_the_render_check_notices_a_missing_plot(report_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(report_dir, broken)
    (broken / "latency_vs_flops.png").unlink()
    dom = rendered_dom(broken / "report.html", tmp_path / "chromium")
    assert 'data-images-loaded="1"' in dom

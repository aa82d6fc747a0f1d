"""The profile's report for a person: two PNG plots and an HTML page that shows them.

- `multipliers.png`: Gator's latency multiplier per edge (bar per edge, 1.0 marked);
- `latency_vs_flops.png`: each edge's relative latency saving against its relative FLOPs
  saving when halved (points above the diagonal save more time than FLOPs);
- `report.html`: the machine and runtime, the whole-model latency measured and predicted,
  the per-edge table, the unstable LUT entries, and the two images. A small script in the page
  records on load how many images decoded (`data-images-loaded` on <body>), which the tests
  read through headless Chromium.
"""
from __future__ import annotations

import html
from pathlib import Path

from .gator_outputs import EdgeSaving


def write_plots(folder: Path, savings: list[EdgeSaving]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{s.index}: {s.name}" for s in savings]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(savings) + 2), 4.2))
    ax.bar(range(len(savings)), [s.multiplier for s in savings], color="#3b6ea5")
    ax.axhline(1.0, color="#999999", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(savings)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("latency multiplier")
    ax.set_title("Gator edge multipliers: relative latency saving / relative FLOPs saving")
    fig.tight_layout()
    fig.savefig(folder / "multipliers.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    x = [100 * s.flops_saving for s in savings]
    y = [100 * s.latency_saving for s in savings]
    ax.scatter(x, y, s=18, color="#a53b3b")
    top = max(x + y + [1.0]) * 1.08
    ax.plot([0, top], [0, top], color="#999999", linewidth=1, linestyle="--")
    for s, xi, yi in zip(savings, x, y):
        ax.annotate(str(s.index), (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlim(0, top)
    ax.set_ylim(min(0.0, min(y) * 1.1), top)
    ax.set_xlabel("FLOPs saving when halved (%)")
    ax.set_ylabel("latency saving when halved (%)")
    ax.set_title("Latency vs FLOPs per edge")
    fig.tight_layout()
    fig.savefig(folder / "latency_vs_flops.png", dpi=110)
    plt.close(fig)
    return ["multipliers.png", "latency_vs_flops.png"]


def write_checkpoint_plot(path: Path, rows: list[dict]) -> None:
    """Predicted latency per checkpoint (profile of several checkpoints in one call)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 2), 4.0))
    ax.bar(range(len(rows)), [r["predicted_ms"] for r in rows], color="#3b6ea5")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([Path(r["checkpoint"]).name for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title("Checkpoints' gated configurations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_html(lut: dict, savings: list[EdgeSaving], images: list[str], predicted_ms: float) -> str:
    esc = html.escape
    cal = lut.get("calibration", {})
    unstable = [(k, e) for k, e in lut["entries"].items() if e.get("unstable")]
    rows = "\n".join(
        f"<tr><td>{s.index}</td><td>{esc(s.name)}</td><td>{s.channels}</td><td>{s.halved}</td>"
        f"<td>{100 * s.flops_saving:.2f}</td><td>{100 * s.latency_saving:.2f}</td><td>{s.multiplier:.3f}</td></tr>"
        for s in savings)
    unstable_rows = "\n".join(
        f"<tr><td><code>{esc(k)}</code></td><td>{e['ms']:.4f}</td><td>{e['cv']:.3f}</td></tr>" for k, e in unstable[:200])
    imgs = "\n".join(f'<figure><img src="{esc(name)}" alt="{esc(name)}"><figcaption>{esc(name)}</figcaption></figure>'
                     for name in images)
    machine, runtime = lut.get("machine", {}), lut.get("runtime", {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gate2deploy profile: {esc(str(lut['model'].get('spec', '')))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}img{{max-width:100%}}</style></head>
<body data-images-expected="{len(images)}" data-images-loaded="pending">
<h1>Latency profile</h1>
<p>Model <code>{esc(str(lut['model'].get('spec', '')))}</code>, input {esc(str(lut['model'].get('input_shape')))},
target <b>{esc(lut['target'])}</b> ({esc(runtime.get('name', ''))} {esc(str(runtime.get('version', '')))}),
{lut['threads']} threads, batch {lut['batch']}, on {esc(machine.get('cpu', ''))} ({esc(str(machine.get('cores', '')))} cores),
{esc(lut['date'])}.</p>
<p id="device">Device: ISA {esc('+'.join(machine.get('isa') or []) or 'none recorded')},
GPU {esc(str(machine.get('gpu') or 'none'))}{esc(_fleet_note(lut))}.</p>
<p id="whole-model">Whole model: measured <b>{cal.get('whole_model_ms', float('nan')):.3f} ms</b>
(cv {cal.get('whole_model_cv', float('nan')):.3f}); sum of layer entries {cal.get('layer_sum_ms', float('nan')):.3f} ms;
in-graph scales {esc(str(cal.get('scales')))}; predicted {predicted_ms:.3f} ms.
({esc(str(cal.get('whole_model_method', '')))}.)
LUT: {len(lut['entries'])} entries, {len(unstable)} unstable (cv above {lut['settings'].get('max_cv')}).</p>
<h2>Edges ({len(savings)}, {esc(lut['table']['edge_source'])})</h2>
{imgs}
<table id="edges"><thead><tr><th>#</th><th>edge</th><th>channels</th><th>halved to</th><th>FLOPs saving %</th>
<th>latency saving %</th><th>multiplier</th></tr></thead><tbody>
{rows}
</tbody></table>
<h2>Unstable entries</h2>
<table id="unstable"><thead><tr><th>key</th><th>ms</th><th>cv</th></tr></thead><tbody>
{unstable_rows}
</tbody></table>
<script>
window.addEventListener("load", function () {{
  var ok = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {{ if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }}
  document.body.setAttribute("data-images-loaded", String(ok));
}});
</script>
</body></html>
"""


def _fleet_note(lut: dict) -> str:
    fleet = lut.get("fleet")
    if not fleet:
        return ""
    return (f"; device class {fleet['device_class']} (Ray resource {fleet['resource']}), "
            f"measured on {len(fleet['nodes'])} node(s)")

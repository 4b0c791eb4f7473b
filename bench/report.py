"""Render ``quality.json`` as a markdown table and a PNG plot of perplexity vs bits per weight."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt_ppl(r: dict) -> str:
    if r.get("error"):
        return "failed"
    p = r.get("ppl")
    return "—" if p is None else (f"{p:.2f}" if math.isfinite(p) and p < 1e5 else f"{p:.3g}")


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown(data: dict) -> str:
    """Method x setting table (perplexity, bits/weight, calibration seconds, peak RSS) plus run details."""
    settings = data["settings"]
    lines = [f"### Perplexity on {data['model']['name']} ({data['eval']['description']})", ""]
    lines += ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    lines.append("| FP32 (unquantized) | " + " | ".join(f"{data['fp_ppl']:.2f}" for _ in settings) + " |")
    for m in data["methods"]:
        cells = []
        for s in settings:
            r = data["results"].get(s, {}).get(m["name"])
            if r is None:
                cells.append("—")
                continue
            best = r.get("ppl") is not None and r.get("ppl") == data["best"].get(s)
            cell = _fmt_ppl(r)
            if r.get("n_skipped"):
                cell += f" ({r['n_skipped']}/{r['n_linears']} float)"
            cells.append(f"**{cell}**" if best else cell)
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: lowest perplexity among methods that quantized every decoder linear; \"(k/n float)\": the "
              "method left k of the n decoder linears unquantized (their in_features is not a multiple of the "
              "group size).", ""]
    lines += ["Bits per weight of the decoder linears (codes + fp16 scale/zero per group; float layers count 16), "
              "calibration wall time and peak RSS of the quantization process:", ""]
    lines += ["| method | setting | bits/weight | float linears | calib. time (s) | peak RSS (GiB) | notes |",
              "|---|---|---|---|---|---|---|"]
    for s in settings:
        for m in data["methods"]:
            r = data["results"].get(s, {}).get(m["name"])
            if r is None:
                continue
            if r.get("error"):
                lines.append(f"| {m['label']} | {s} | | | | | failed: {r['error'][:160]} |")
                continue
            lines.append(f"| {m['label']} | {s} | {r['bpw']:.2f} | {r['n_skipped']}/{r['n_linears']} | "
                         f"{r['calib_seconds']:.0f} | {r['peak_rss_mib'] / 1024:.2f} | {_short(r.get('notes', ''))} |")
    lines += ["", "Run details:", ""]
    for k, v in data["run"].items():
        lines.append(f"- {k}: {v}")
    if data.get("not_run"):
        lines.append("- not run: " + "; ".join(f"{k} ({v})" for k, v in data["not_run"].items()))
    if data.get("goal"):
        lines += ["", "Goal check (OmniQuant lowest perplexity at every setting): " + data["goal"]]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    """Perplexity (log scale) vs bits per weight, one marker style per method; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^vDPX*<>"
    for i, m in enumerate(data["methods"]):
        pts = [(r["bpw"], r["ppl"]) for s in data["settings"]
               if (r := data["results"].get(s, {}).get(m["name"])) and r.get("ppl") is not None and not r.get("error")]
        if pts:
            pts.sort()
            ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=m["label"])
    ax.axhline(data["fp_ppl"], color="k", ls="--", lw=1, label="FP32")
    ax.set_xlabel("bits per weight (decoder linears, incl. scale/zero)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{data['model']['name'].split(' (')[0]}: {data['eval'].get('description', '')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="re-render quality.json as markdown (+ PNG)")
    ap.add_argument("json", type=Path, nargs="?", default=Path("build/bench/quality.json"))
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    md = markdown(data)
    if plot(data, args.json.with_suffix(".png")):
        md += f"\n![perplexity vs bits per weight]({args.json.with_suffix('.png').name})\n"
    args.json.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

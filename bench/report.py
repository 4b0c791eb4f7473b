"""Render ``quality.json`` as a markdown table and a PNG plot of perplexity vs bits per weight, and write the README's
results section from it.

    python -m bench.report [build/bench/quality.json]                     # quality.md + quality.png beside the JSON
    python -m bench.report --readme README.md [build/bench/quality.json]  # also bench/results/quality-<mode>.*
    python -m bench.report --readme README.md build/bench/quality-wa.json # weight-activation run, its own section
                                                                          # and the README section between the markers
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from omniquant.atomic import atomic_write

README_BEGIN = "<!-- bench-quality:begin -->"
README_END = "<!-- bench-quality:end -->"


def kind_suffix(data: dict) -> str:
    """"-wa" for a run of weight-activation settings only (its files and README section are separate), else ""."""
    return "-wa" if data.get("kind") == "weight-act" else ""


def markers(data: dict) -> tuple[str, str]:
    """The README markers of `data`'s section: bench-quality or bench-quality-wa."""
    sfx = kind_suffix(data)
    return README_BEGIN.replace(":begin", f"{sfx}:begin"), README_END.replace(":end", f"{sfx}:end")


def _fmt_ppl(r: dict) -> str:
    if r.get("error"):
        return "failed"
    p = r.get("ppl")
    return "—" if p is None else (f"{p:.2f}" if math.isfinite(p) and p < 1e5 else f"{p:.3g}")


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def ppl_table(data: dict) -> list[str]:
    """Method x setting perplexity table (markdown lines) with its legend."""
    settings = data["settings"]
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
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
    legend = ("Bold: lowest perplexity among methods that quantized every decoder linear at the common budget "
              "(a row marked with a larger budget is never bold); \"(k/n float)\": "
              "the method left k of the n decoder linears unquantized (their in_features is not a multiple of "
              "the group size).")
    return [*lines, "", legend]


def run_details(data: dict) -> list[str]:
    """Bullet list: date, machine, versions, settings, jobs/threads, wall time, peers not run."""
    lines = [f"- {k}: {v}" for k, v in data["run"].items()]
    peers = sorted({f"{pkg} {ver}" for rs in data["results"].values() for r in rs.values()
                    for pkg, ver in (r.get("versions") or {}).items() if pkg not in ("torch", "transformers",
                                                                                      "omniquant-mlc")})
    if peers:
        lines.append("- peer versions (own venvs): " + ", ".join(peers))
    if data.get("not_run"):
        lines.append("- not run: " + "; ".join(f"{k} ({v})" for k, v in data["not_run"].items()))
    return lines


def markdown(data: dict) -> str:
    """Method x setting table (perplexity, bits/weight, calibration seconds, peak RSS) plus run details."""
    settings = data["settings"]
    lines = [f"### Perplexity on {data['model']['name']} ({data['eval']['description']})", ""]
    lines += ppl_table(data) + [""]
    lines += [("Bits per weight of the decoder linears (codes + fp16 scale/zero per group; float layers count 16), "
               "calibration wall time and peak RSS of the quantization process:"), ""]
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
    lines += ["", "Run details:", ""] + run_details(data)
    if data.get("goal"):
        lines += ["", "Goal check: " + data["goal"]]
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


def _partly_float(data: dict) -> str:
    """One sentence naming the methods that left linears float (their perplexities are not comparable)."""
    seen = {}
    for rs in data["results"].values():
        for name, r in rs.items():
            if r.get("n_skipped") and r.get("ppl") is not None:
                seen.setdefault(name, (r["n_skipped"], r["n_linears"], r["bpw"]))
    if not seen:
        return ""
    labels = {m["name"]: m["label"] for m in data["methods"]}
    parts = [f"{labels.get(n, n)} {k}/{t} ({bpw:.1f} bits/weight)" for n, (k, t, bpw) in seen.items()]
    return ("Left in float because their in_features is not a multiple of the group size: " + ", ".join(parts)
            + "; their perplexities are not comparable with those of the methods that quantize every linear.")


def readme_section(data: dict, md_link: str, png_link: str | None, source: str = "build/bench/quality.json") -> str:
    """The README's results section (between the markers): perplexity table, plot, goal check, run details."""
    quick = data["run"].get("mode") == "quick"
    begin, end = markers(data)
    wa = kind_suffix(data)
    title = "Weight-activation quantization against other quantizers" if wa else "Against other quantizers"
    command = f"python -m bench.quality{' --quick' if quick else ''}" + (
        f" --settings {','.join(data['settings'])}" if wa else "")
    lines = [begin,
             (f"<!-- generated by `python -m bench.report --readme` from {source}: edit bench/report.py, not this "
              "section -->"),
             f"### {title} (`{command}`, {data['eval']['description']})", ""]
    lines += ppl_table(data)
    if (note := _partly_float(data)):
        lines += ["", note]
    if data.get("goal"):
        goal = ("**Goal check** (best of our recipes lowest among fully quantized methods at every setting; "
                "W2g128 <= 2 x FP; calibration time <= AutoRound's; CLI defaults at a small budget): "
                f"{data['goal']}.")
        lines += ["", goal]
    lines += ["", f"Full table with bits/weight, calibration times and peak memory: [`{md_link}`]({md_link})."]
    if png_link:
        lines += ["", f"![perplexity vs bits per weight]({png_link})"]
    lines += ["", "Run:", ""] + run_details(data) + [end]
    return "\n".join(lines)


def replace_section(text: str, section: str, begin: str = README_BEGIN, end: str = README_END) -> str:
    """``text`` with everything from ``begin`` to ``end`` (markers included) replaced by ``section``."""
    nb, ne = text.count(begin), text.count(end)
    if nb != 1 or ne != 1:
        raise ValueError(f"expected exactly one {begin} and one {end} line, found {nb} and {ne}")
    i, j = text.index(begin), text.index(end)
    if j < i:
        raise ValueError(f"{end} comes before {begin}")
    return text[:i] + section + text[j + len(end):]


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def publish(json_path: Path, readme: Path, results_dir: Path) -> list[Path]:
    """Copy the run into ``results_dir`` as quality-<mode>.{json,md,png} (tracked beside the README) and rewrite
    the README's marked section from it; returns the files written."""
    data = json.loads(json_path.read_text())
    text = readme.read_text()
    begin, end = markers(data)
    replace_section(text, "", begin, end)  # check the markers before writing anything
    stem = f"quality-{data['run'].get('mode', 'full')}{kind_suffix(data)}"
    results_dir.mkdir(parents=True, exist_ok=True)
    out_json, out_md, out_png = (results_dir / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    has_png = plot(data, out_png)
    links = [Path(os.path.relpath(p.resolve(), readme.resolve().parent)).as_posix() for p in (out_md, out_png)]
    new = replace_section(text, readme_section(data, links[0], links[1] if has_png else None, json_path.as_posix()),
                          begin, end)
    write_text_atomic(out_json, json.dumps(data, indent=2) + "\n")
    plot_md = f"\n![perplexity vs bits per weight]({out_png.name})\n" if has_png else ""
    write_text_atomic(out_md, markdown(data) + plot_md)
    write_text_atomic(readme, new)
    return [out_json, out_md, *([out_png] if has_png else []), readme]


def merge_runs(base: dict, new: dict) -> dict:
    """`new` with the results of the methods it did not run taken from `base` (an earlier run of the same settings,
    windows and budget, e.g. bench/results/quality-quick.json), best / goal recomputed; `run.merged` says which rows
    come from which run. ValueError when the two runs are not comparable."""
    from bench.methods import METHODS, parse_setting
    from bench.quality import best_of_ours, goal_check

    for key in ("eval", "calibration", "config", "settings", "kind"):
        if base.get(key) != new.get(key):
            raise ValueError(f"cannot merge: the runs differ in {key} ({base.get(key)} vs {new.get(key)})")
    if abs(base["fp_ppl"] - new["fp_ppl"]) > 1e-6 * base["fp_ppl"]:
        raise ValueError(f"cannot merge: float perplexity {base['fp_ppl']} vs {new['fp_ppl']} (another model?)")
    ran = {m["name"] for m in new["methods"]}
    order = list(METHODS)
    methods = sorted({m["name"]: m for m in base["methods"] + new["methods"]}.values(),
                     key=lambda m: order.index(m["name"]) if m["name"] in order else len(order))
    results = {st: {m["name"]: r[m["name"]] for m in methods if m["name"] in (r := {**base["results"].get(st, {}),
                                                                                    **new["results"].get(st, {})})}
               for st in new["settings"]}
    best, goal = goal_check([parse_setting(st) for st in new["settings"]], results, new["fp_ppl"])
    old = [m["name"] for m in methods if m["name"] not in ran]
    run = {**new["run"], "merged": f"rows {', '.join(sorted(ran))} from this run; {', '.join(old)} from the run of "
                                   f"{base['run']['date']} ({base['run']['machine']}; load at its end "
                                   f"{base['run'].get('load average at the end (1/5/15 min)', '?')})"}
    return {**new, "methods": methods, "results": results, "best": best, "goal": "; ".join(goal),
            "best_recipe": {st: best_of_ours(rs) for st, rs in results.items()}, "run": run}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="re-render quality.json as markdown (+ PNG); --readme: also publish "
                                             "it to the README's marked section")
    ap.add_argument("json", type=Path, nargs="?", default=Path("build/bench/quality.json"))
    ap.add_argument("--readme", type=Path, help=f"rewrite the part of this file between {README_BEGIN} and "
                                                f"{README_END} (bench-quality-wa markers for a weight-activation run)")
    ap.add_argument("--results-dir", type=Path, default=Path("bench/results"),
                    help="with --readme: where quality-<mode>.{json,md,png} are copied (default: %(default)s)")
    ap.add_argument("--merge", type=Path, metavar="BASE_JSON",
                    help="first fill in the rows this run lacks from BASE_JSON, an earlier run of the same settings "
                         "and windows (e.g. bench/results/quality-quick.json after re-running some methods with "
                         "--methods), and rewrite the json")
    args = ap.parse_args(argv)
    if not args.json.exists():
        print(f"error: {args.json} does not exist (run python -m bench.quality first)", file=sys.stderr)
        return 2
    if args.merge:
        try:
            merged = merge_runs(json.loads(args.merge.read_text()), json.loads(args.json.read_text()))
        except (OSError, ValueError) as e:
            print(f"error: --merge {args.merge}: {e}", file=sys.stderr)
            return 2
        write_text_atomic(args.json, json.dumps(merged, indent=2) + "\n")
    if args.readme:
        try:
            written = publish(args.json, args.readme, args.results_dir)
        except (OSError, ValueError) as e:
            print(f"error: {args.readme}: {e}", file=sys.stderr)
            return 2
        print("wrote " + ", ".join(map(str, written)))
        return 0
    data = json.loads(args.json.read_text())
    md = markdown(data)
    if plot(data, args.json.with_suffix(".png")):
        md += f"\n![perplexity vs bits per weight]({args.json.with_suffix('.png').name})\n"
    write_text_atomic(args.json.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

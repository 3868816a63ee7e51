"""PNG plots of the overload and restart-storm results (matplotlib, Agg backend).

Requests per second by outcome over time (stacked, keyed by the *scheduled* second of each
request, so a second's stack adds up to what was offered during it), one panel per front.

    python -m loadtest.plot loadtest/results/overload.json loadtest/results/restart-storm.json

Each JSON file gets a PNG beside it (same name, .png). The scenarios call this themselves.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUTCOMES = ("ok", "late", "503", "429", "other", "error", "timeout")
COLORS = {
    "ok": "#2ca02c",
    "late": "#ffbf00",
    "503": "#d62728",
    "429": "#e377c2",
    "other": "#7f7f7f",
    "error": "#000000",
    "timeout": "#8c564b",
}
LABELS = {
    "ok": "2xx ≤ 500 ms (goodput)",
    "late": "2xx > 500 ms",
    "503": "503 (shed)",
    "429": "429",
    "other": "other status",
    "error": "connection error",
    "timeout": "client timeout (5 s)",
}


def _stack(ax: Any, xs: Sequence[float], per_second: Sequence[dict[str, Any]], legend: bool) -> None:
    present = [o for o in OUTCOMES if any(b.get(o, 0) for b in per_second)]
    ys = [[b.get(o, 0) for b in per_second] for o in present]
    if ys:
        ax.stackplot(
            xs,
            ys,
            labels=[LABELS[o] for o in present],
            colors=[COLORS[o] for o in present],
            step="post",
            alpha=0.9,
        )
    ax.step(
        xs,
        [b["offered"] for b in per_second],
        where="post",
        color="#1f77b4",
        lw=1.2,
        ls="--",
        label="offered",
    )
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, framealpha=0.8)


def plot_overload(doc: dict[str, Any], out: Path) -> Path:
    runs = doc["runs"]
    fronts = list(dict.fromkeys(r["front"] for r in runs))
    mults = sorted({r["multiplier"] for r in runs})
    cap = doc["model"]["capacity_rps"]
    fig, axes = plt.subplots(len(fronts) + 1, 1, figsize=(12, 2.4 * (len(fronts) + 1) + 1), squeeze=False)
    ax0 = axes[0][0]
    loaded = [m for m in mults if m >= 1]
    for f in fronts:
        pts = sorted(
            (r["multiplier"], r["goodput_pct_of_C"]) for r in runs if r["front"] == f and r["multiplier"] >= 1
        )
        if pts:
            ax0.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=doc["fronts"].get(f, f))
    ax0.set_xscale("log", base=2)
    ax0.set_xticks(loaded or [1])
    ax0.set_xticklabels([f"{m:g}xC" for m in loaded] or ["1xC"])
    ax0.set_ylim(0, 110)
    ax0.set_ylabel("goodput, % of C")
    ax0.set_title(
        f"Goodput under overload (C = {cap:.0f} req/s, goodput = 2xx within {doc['model']['slo_ms']:g} ms)",
        fontsize=10,
    )
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=7, loc="lower left")
    for i, f in enumerate(fronts, start=1):
        ax = axes[i][0]
        xs: list[float] = []
        series: list[dict[str, Any]] = []
        t = 0.0
        for m in mults:
            r = next((r for r in runs if r["front"] == f and r["multiplier"] == m), None)
            if r is None:
                continue
            ax.axvline(t, color="#444", lw=0.6)
            ax.text(
                t + 0.1,
                0.9,
                f"{m:g}xC",
                transform=ax.get_xaxis_transform(),
                fontsize=8,
                va="top",
                ha="left",
                weight="bold",
            )
            for b in r["per_second"]:
                xs.append(t + b["t"])
                series.append(b)
            t += len(r["per_second"])
        if series:
            xs.append(t)
            series.append({**series[-1]})
            _stack(ax, xs, series, legend=True)
        ax.set_ylabel("req/s", fontsize=8)
        ax.set_title(doc["fronts"].get(f, f), fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("seconds of schedule (points back to back)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_restart_storm(doc: dict[str, Any], out: Path) -> Path:
    runs = doc["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.6 * len(runs) + 0.5), squeeze=False, sharex=True)
    for i, r in enumerate(runs):
        ax = axes[i][0]
        ps = r["per_second"]
        xs = [b["t"] for b in ps] + [len(ps)]
        _stack(ax, xs, [*ps, {**ps[-1]}] if ps else [], legend=False)
        for k, ev in enumerate(r["kills"]):
            ax.axvline(ev["t"], color="#d62728", lw=1.0, ls=":", label="instance killed" if k == 0 else None)
        rec = r.get("recovered_at_s")
        if rec is not None:
            ax.axvline(rec, color="#2ca02c", lw=1.5, label="recovered")
        ax.legend(loc="lower right", fontsize=7, ncol=4, framealpha=0.8)
        title = (
            f"{r['description']}: killed {r['killed']} ({r['killed_after_ramp']} after the first ramp), "
            f"recovered {f'at {rec:.0f} s' if rec is not None else 'never'}, "
            f"goodput last {r['last_window_s']:g} s {r['goodput_last_pct']:.0f}%"
        )
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("req/s", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("seconds since load start")
    m = doc["model"]
    fig.suptitle(
        f"Restart storm: 3 instances warming 10%→100% over {m['warmup_s']:g} s, "
        f"offered {m['offered_rps']:.0f} req/s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_file(path: Path) -> Path:
    doc = json.loads(path.read_text())
    out = path.with_suffix(".png")
    if doc.get("scenario") == "overload":
        return plot_overload(doc, out)
    if doc.get("scenario") == "restart_storm":
        return plot_restart_storm(doc, out)
    raise ValueError(f"{path}: unknown scenario {doc.get('scenario')!r}")


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m loadtest.plot RESULT.json [...]", file=sys.stderr)
        return 2
    for p in paths:
        print(plot_file(Path(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn the results of one run into the table, the JSON files and the chart.

The table is what a reader checks against the issue's targets; the chart shows every
workload's mkv figure beside its baseline, so the gaps are visible at a glance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bench.workloads import KIB, MIB

#: Where a run's files go: ignored by git, so `make bench` never dirties the tree.
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_GET = 0.85
TARGET_PUT_SMALL = 0.7
TARGET_BIG = 0.8
TARGET_GROWTH_MIB = 64.0
#: The sizes the issue sets targets for; FULL's other sizes are shown for information.
TARGETED_SMALL, TARGETED_BIG = KIB, 4 * MIB


@dataclasses.dataclass
class Row:
    workload: str
    mkv: str
    baseline: str
    ratio: float | None
    target: str
    passed: bool | None  # None: a figure for information, no target


@dataclasses.dataclass
class Panel:
    """One chart panel: a throughput of mkv beside its baseline (the median runs), and
    the ratio the table reports (the median of the rounds' own ratios)."""

    title: str
    unit: str
    mkv: float
    baseline: float
    ratio: float
    target: float | None


def ratio_text(r: float) -> str:
    """Two decimals, rounded down, so a ratio just under its target never reads as on it."""
    return f"{math.floor(r * 100) / 100:.2f}"


def size_name(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def _ratio_row(name: str, mkv: str, base: str, r: float, target: float | None) -> Row:
    return Row(name, mkv, base, r, f">= {target}" if target else "info",
               (r >= target) if target else None)


def _rps(d: dict, key: str = "rps") -> str:
    """Rate and p99, and the server's CPU per request where it was measured."""
    text = f"{d[key]:,.0f} req/s, p99 {d['p99_ms']:.1f} ms"
    if "server_cpu_us" in d:
        text += f", {d['server_cpu_us']:,.0f} µs CPU/req"
    return text


def rows_and_panels(res: dict) -> tuple[list[Row], list[Panel]]:
    rows: list[Row] = []
    panels: list[Panel] = []
    for key, title in (("get_hit", "GET existing key (302)"), ("get_miss", "GET missing key (404)")):
        if key in res:
            w = res[key]
            rows.append(_ratio_row(title, _rps(w["mkv"]), _rps(w["baseline"]), w["ratio"], TARGET_GET))
            panels.append(Panel(title, "req/s", w["mkv"]["rps"], w["baseline"]["rps"], w["ratio"],
                                TARGET_GET))
    for w in res.get("put_small", []):
        title = f"PUT {size_name(w['size'])}, {w['clients']} clients"
        target = TARGET_PUT_SMALL if w["size"] == TARGETED_SMALL else None
        m, b = w["mkv"], w["baseline"]
        mkv = (_rps(m, "ops_per_s") + f", mkv {m['mkv_cpu_us'] / 1e3:.2f} ms CPU/PUT"
               f" (wrk: {w['mkv_wrk']['rps']:,.0f} req/s)")
        base = _rps(b, "ops_per_s") + f", client {b['client_cpu']:.2f} cores"
        rows.append(_ratio_row(title, mkv, base, w["ratio"], target))
        panels.append(Panel(title, "req/s", m["ops_per_s"], b["ops_per_s"], w["ratio"], target))
    for w in res.get("big", []):
        target = TARGET_BIG if w["size"] == TARGETED_BIG else None
        for op in ("put", "get"):
            title = f"{op.upper()} {size_name(w['size'])}, {w['clients']} clients"
            m, b = w["mkv"][op]["mb_per_s"], w["baseline"][op]["mb_per_s"]
            cpu = w["mkv"][op]["mkv_cpu_us"]
            cost = (f"mkv {cpu / 1e3:.1f} ms CPU/value" if op == "put"
                    else f"mkv {cpu:,.0f} µs CPU/redirect")
            rows.append(_ratio_row(title, f"{m:,.0f} MB/s, {cost}", f"{b:,.0f} MB/s",
                                   w[f"{op}_ratio"], target))
            panels.append(Panel(title, "MB/s", m, b, w[f"{op}_ratio"], target))
    if "memory" in res:
        m = res["memory"]
        worst = max(m["processes"], key=lambda p: p["growth_mib"])
        rows.append(Row(f"RSS during a {size_name(m['value_mib'] * MIB)} PUT (largest growth)",
                        f"+{worst['growth_mib']:.1f} MiB ({worst['process']}, peak "
                        f"{worst['peak_mib']:.0f} MiB)", f"idle {worst['idle_mib']:.0f} MiB", None,
                        f"<= {TARGET_GROWTH_MIB:.0f} MiB", m["max_growth_mib"] <= TARGET_GROWTH_MIB))
    if "writer_service" in res:
        w = res["writer_service"]
        rows.append(Row(f"writer under {w['clients']} concurrent PUTs (service)",
                        f"{w['commits_per_s']:,.0f} commits/s, {w['keys_per_commit']:.1f} keys/commit",
                        f"{w['puts']['ops_per_s']:,.0f} PUT/s", None, "info", None))
    if "writer_direct" in res:
        b, c = res["writer_direct"]["baseline"], res["writer_direct"]["concurrent"]
        rows.append(Row(f"writer, {c['writers']} writers on its socket (lock + put)",
                        f"{c['writes_per_s']:,.0f} writes/s, {c['commits_per_s']:,.0f} commits/s, "
                        f"{c['keys_per_commit']:.1f} keys/commit",
                        f"1 writer: {b['writes_per_s']:,.0f} writes/s", c["writes_per_s"] / b["writes_per_s"],
                        "info", None))
    return rows, panels


def markdown(rows: list[Row]) -> str:
    lines = ["| workload | mkv | baseline | ratio | target | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = ratio_text(r.ratio) if r.ratio is not None else "—"
        result = "info" if r.passed is None else ("pass" if r.passed else "**FAIL**")
        lines.append(f"| {r.workload} | {r.mkv} | {r.baseline} | {ratio} | {r.target} | {result} |")
    return "\n".join(lines)


def floor_markdown(res: dict) -> str:
    """The floor under the ratios (bench.floor): mkv's own CPU, one thread, no contention."""
    if "floor" not in res:
        return ""
    lines = ["", "", "mkv's own CPU per operation, in one thread with nothing else running "
             "(`python -m bench.floor`):", "", "| operation | CPU |", "|---|---|"]
    for row in res["floor"]:
        us = row["cpu_us"]
        lines.append(f"| {row['what']} | {us / 1e3:.2f} ms |" if us >= 1000
                     else f"| {row['what']} | {us:.1f} µs |")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    """The chart needs matplotlib (the `bench` extra); without it the rest still runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def chart(panels: list[Panel], res: dict, path: Path) -> None:
    """The ratios at a glance, then mkv beside its baseline per workload, memory, writer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = 1 + ("memory" in res) + ("writer_direct" in res or "writer_service" in res)
    cols = 4
    nrows = math.ceil((len(panels) + extra) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    flat = list(axes.flat)
    green, red, grey, blue = "#2e8b57", "#c0392b", "#9e9e9e", "#1f77b4"
    ax = flat[0]  # the summary first: the whole picture at a glance
    names = [p.title.split(",")[0] for p in panels]
    ratios = [p.ratio for p in panels]
    colors = [blue if p.target is None else (green if r >= p.target else red)
              for p, r in zip(panels, ratios, strict=True)]
    ax.barh(names, ratios, color=colors)
    for j, p in enumerate(panels):
        if p.target:
            ax.plot([p.target, p.target], [j - 0.4, j + 0.4], color="black", lw=2)
    ax.axvline(1.0, color=grey, lw=0.8, ls="--")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("mkv / baseline, median of rounds (black tick: target)")
    ax.set_title("All throughput ratios", fontsize=10)
    for ax, p in zip(flat[1:], panels, strict=False):
        r = p.ratio
        ok = None if p.target is None else r >= p.target
        bars = ax.bar(["baseline", "mkv"], [p.baseline, p.mkv],
                      color=[grey, blue if ok is None else (green if ok else red)])
        ax.bar_label(bars, labels=[f"{p.baseline:,.0f}", f"{p.mkv:,.0f}"], padding=2, fontsize=9)
        verdict = "info" if ok is None else ("pass" if ok else "FAIL")
        goal = f" (target {p.target})" if p.target else ""
        ax.set_title(f"{p.title}\nratio {ratio_text(r)}{goal}: {verdict}", fontsize=10)
        ax.set_ylabel(p.unit)
        ax.set_ylim(0, max(p.mkv, p.baseline) * 1.18 or 1)
        ax.spines[["top", "right"]].set_visible(False)
    i = len(panels) + 1
    if "memory" in res:
        ax, m = flat[i], res["memory"]
        procs = sorted(m["processes"], key=lambda p: (p["process"], p["pid"]))
        names = [f"{p['process']}\n{p['pid']}" for p in procs]
        x = range(len(procs))
        ax.bar([j - 0.2 for j in x], [p["idle_mib"] for p in procs], 0.4, color=grey, label="idle")
        ax.bar([j + 0.2 for j in x], [p["peak_mib"] for p in procs], 0.4,
               color=green if m["max_growth_mib"] <= TARGET_GROWTH_MIB else red, label="peak")
        ax.set_xticks(list(x), names, fontsize=7)
        ax.set_ylabel("RSS MiB")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_ylim(0, max(p["peak_mib"] for p in procs) * 1.3)
        ax.set_title(f"RSS during a {m['value_mib']} MiB PUT\nlargest growth "
                     f"{m['max_growth_mib']:.1f} MiB (limit {TARGET_GROWTH_MIB:.0f})", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        i += 1
    if "writer_direct" in res or "writer_service" in res:
        _writer_panel(flat[i], res, blue, grey)
        i += 1
    for ax in flat[i:]:
        ax.axis("off")
    meta = res["meta"]
    fig.suptitle(f"mkv benchmark ({meta['mode']}, {meta['started']}, {meta['cpus']} CPUs, "
                 f"load average {meta['loadavg_start'][0]:.1f} at start, "
                 f"{meta['loadavg_end'][0]:.1f} at end)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _writer_panel(ax: Any, res: dict, blue: str, grey: str) -> None:
    """Group commit: writes/s, labelled with keys per commit."""
    bars: list[tuple[str, float, float, str]] = []
    if "writer_direct" in res:
        b, c = res["writer_direct"]["baseline"], res["writer_direct"]["concurrent"]
        bars += [("1 writer\n(socket)", b["writes_per_s"], b["keys_per_commit"], grey),
                 (f"{c['writers']} writers\n(socket)", c["writes_per_s"], c["keys_per_commit"], blue)]
    if "writer_service" in res:
        w = res["writer_service"]
        bars.append((f"{w['clients']} PUTs\n(service)", w["puts"]["ops_per_s"], w["keys_per_commit"], blue))
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[3] for b in bars])
    ax.bar_label(drawn, labels=[f"{b[1]:,.0f}/s\n{b[2]:.1f} keys/commit" for b in bars],
                 padding=2, fontsize=8)
    ax.set_ylim(0, max(b[1] for b in bars) * 1.35)
    ax.set_ylabel("writes/s")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("Writer: group commit", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)


def write(res: dict) -> tuple[str, Path | None]:
    """Save JSON (timestamped and latest), the table and the chart; the table and the
    chart's path (None without matplotlib)."""
    rows, panels = rows_and_panels(res)
    res["table"] = [dataclasses.asdict(r) for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2)
    stamp = res["meta"]["started"].replace(":", "").replace("-", "")
    (RESULTS / f"{stamp}-{res['meta']['mode']}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    table = markdown(rows) + floor_markdown(res)
    (RESULTS / "latest.md").write_text(table + "\n")
    if not have_matplotlib():
        return table, None
    png = RESULTS / "latest.png"
    chart(panels, res, png)
    return table, png

"""The curation report: one self-contained HTML file (plots as inline PNGs, no scripts, no network) that
says what went in, what came out, which step removed what and why, with examples.

Plots are drawn with matplotlib's Agg canvas on plain `Figure`s, never pyplot, so writing a report
touches no global backend state and works in any worker. Histograms draw at most `HIST_SAMPLE`
values per series (a fixed-seed sample), which keeps a report over millions of rows to seconds.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from pipelines.curate.steps.image import original_size

HIST_SAMPLE = 100_000
HIST_BINS = 50
EXAMPLES_PER_REASON = 5
KEPT_COLOR, REMOVED_COLOR = "#4c72b0", "#dd8452"
SIZE_COLUMNS = ("width", "height", "original_width", "original_height")
THOUSANDS = StrMethodFormatter("{x:,.0f}")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }}
h2 {{ border-bottom: 1px solid #ccc; margin-top: 2em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.key {{ font-family: monospace; word-break: break-all; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
p.nodata {{ color: #888; font-style: italic; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def write_report(path: str, title: str, stats: dict[str, Any], kept: pd.DataFrame, removed: pd.DataFrame) -> None:
    """Write the HTML report of one curation run to `path` (a local path or fsspec URL).

    `stats`: the run's counts (`input`, `output`, `elapsed_s`, `steps` in pipeline order); `kept`: one
    row per kept sample (any of `chars`, `text`, sizes, scores); `removed`: the removal log (`key`,
    `step`, `reason`, `cluster_id`, `kept_key`, `similarity`, maybe `chars`/sizes). Plots whose
    columns are missing say "no data" instead.
    """
    steps = stats.get("steps") or []
    sections = [
        _summary(stats),
        _section("Samples through the steps",
                 *((_funnel_plot(steps), _steps_table(steps)) if steps else (_no_data("no steps ran"),))),
        _section("Caption / text length", _length_plot(kept, removed)),
    ]
    if any(c in df for df in (kept, removed) for c in SIZE_COLUMNS):
        sections.append(_section("Image size", _image_size_plot(kept, removed)))
    sections += [
        _section("Duplicate clusters", *_cluster_plot(removed)),
        _section("Example removals", _examples_table(removed, [str(s.get("step")) for s in steps])),
        _section("Columns of the kept samples", _columns_table(kept)),
    ]
    page = _PAGE.format(title=_esc(title), body="\n".join(sections))
    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(page)


# -- sections ------------------------------------------------------------------------------------
def _summary(stats: dict[str, Any]) -> str:
    inp, out = stats.get("input") or {}, stats.get("output") or {}
    samples_in, samples_out = inp.get("samples"), out.get("samples")
    share = f" ({samples_out / samples_in:.1%} of input)" if samples_in and samples_out is not None else ""
    corrupt = inp.get("corrupt_shards") or {}
    rows = [("input shards", _fmt(inp.get("shards"))), ("input samples", _fmt(samples_in)),
            ("corrupt shards", _fmt(len(corrupt))), ("output samples", _fmt(samples_out) + share),
            ("output shards", _fmt(out.get("shards"))), ("elapsed", _seconds(stats.get("elapsed_s")))]
    parts = [_table(None, [[_td(k), _td(v, "num")] for k, v in rows])]
    if corrupt:
        parts.append("<h3>Corrupt shards</h3>")
        parts.append(_table(["shard", "reason"], [[_td(k, "key"), _td(v)] for k, v in corrupt.items()]))
    return "\n".join(parts)


def _steps_table(steps: list[dict[str, Any]]) -> str:
    rows = []
    for s in steps:
        dropped = s.get("dropped") or {}
        n_in, n_kept = s.get("in"), s.get("kept")
        by_reason = ", ".join(f"{r}: {n:,}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        kept_share = f"{n_kept / n_in:.1%}" if n_in else ""
        rows.append([_td(s.get("step")), _td(n_in, "num"), _td(n_kept, "num"), _td(sum(dropped.values()), "num"),
                     _td(kept_share, "num"), _td(by_reason), _td(_seconds(s.get("seconds")), "num")])
    return _table(["step", "in", "kept", "dropped", "kept %", "dropped by reason", "time"], rows)


def _funnel_plot(steps: list[dict[str, Any]]) -> str:
    names = [str(s.get("step")).replace("$", r"\$") for s in steps]  # `$` would start matplotlib mathtext
    n_in = np.array([s.get("in") or 0 for s in steps], dtype=float)
    n_kept = np.array([s.get("kept") or 0 for s in steps], dtype=float)
    y = np.arange(len(steps))
    fig = Figure(figsize=(8, 1.0 + 0.55 * len(steps)))
    ax = fig.subplots()
    ax.barh(y - 0.2, n_in, height=0.4, color="#bbbbbb", label="in")
    ax.barh(y + 0.2, n_kept, height=0.4, color=KEPT_COLOR, label="kept")
    for yi, i, k in zip(y, n_in, n_kept):
        if i:
            ax.text(k, yi + 0.2, f" {k / i:.1%}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.xaxis.set_major_formatter(THOUSANDS)
    ax.set_xlim(0, max(n_in.max(initial=0), n_kept.max(initial=0), 1) * 1.12)
    ax.legend(loc="lower right")
    return _png(fig, "samples in and kept per step")


def _length_plot(kept: pd.DataFrame, removed: pd.DataFrame) -> str:
    series = {label: values for label, values in (("kept", _lengths(kept)), ("removed", _lengths(removed)))
              if values is not None and len(values)}
    if not series:
        return _no_data("no chars or text column")
    fig = Figure(figsize=(8, 3.5))
    _histogram(fig.subplots(), series, "characters")
    return _png(fig, "caption/text length in characters")


def _image_size_plot(kept: pd.DataFrame, removed: pd.DataFrame) -> str:
    sizes = {label: _sizes(df) for label, df in (("kept", kept), ("removed", removed))}
    sizes = {label: wh for label, wh in sizes.items() if wh is not None and len(wh)}
    if not sizes:
        return _no_data("no image sizes")
    fig = Figure(figsize=(10, 3.5))
    for ax, side in zip(fig.subplots(1, 2), ("width", "height")):
        _histogram(ax, {label: wh[side] for label, wh in sizes.items()}, f"{side} (pixels, original where known)")
    return _png(fig, "image width and height")


def _cluster_plot(removed: pd.DataFrame) -> tuple[str, ...]:
    if "cluster_id" not in removed:
        return (_no_data("no duplicate clusters"),)
    dup = removed[removed["cluster_id"].notna()]
    if dup.empty:
        return (_no_data("no duplicate clusters"),)
    by_cluster = dup.groupby("cluster_id")
    # A cluster is its removed members plus the copy kept for them, unless every copy went (no kept_key).
    survivor = by_cluster["kept_key"].count().gt(0).astype(int) if "kept_key" in dup else 1
    sizes = (by_cluster.size() + survivor).to_numpy()
    largest = int(sizes.max())
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    if largest <= HIST_BINS:
        bins = np.arange(1.5, largest + 1.5)
    else:
        bins = np.unique(np.logspace(np.log10(1.5), np.log10(largest + 0.5), HIST_BINS))
        ax.set_xscale("log")
    ax.hist(sizes, bins=bins, color=REMOVED_COLOR, log=True)
    ax.set_ylim(bottom=0.5)  # log axis: let a bar of one cluster show
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_xlabel("cluster size (samples, kept copy included)")
    ax.set_ylabel("clusters")
    note = (f"<p>{len(sizes):,} clusters, {len(dup):,} duplicates removed, "
            f"largest cluster {largest:,} samples.</p>")
    return note, _png(fig, "duplicate cluster sizes")


def _examples_table(removed: pd.DataFrame, step_order: list[str]) -> str:
    if removed.empty or "reason" not in removed:
        return _no_data("nothing was removed")
    by = [c for c in ("step", "reason") if c in removed]
    cols = by + [c for c in ("key", "kept_key", "similarity") if c in removed]
    rank = {name: i for i, name in enumerate(step_order)}

    def order(item: tuple[tuple[Any, ...], pd.DataFrame]) -> tuple[int, int]:
        """Pipeline order, then each step's most frequent reason first."""
        key, group = item
        return rank.get(key[0], len(rank)) if by[0] == "step" else 0, -len(group)

    groups = sorted(removed.groupby(by, sort=False, dropna=False), key=order)
    rows = []
    for _, group in groups:
        for i, (_, r) in enumerate(group.head(EXAMPLES_PER_REASON).iterrows()):
            rows.append([_td(r[c], "num" if c == "similarity" else "key" if c.endswith("key") else "") for c in cols]
                        + [_td(len(group) if i == 0 else None, "num")])
    return (f"<p>The first {EXAMPLES_PER_REASON} removals of each reason, and how many it removed in all.</p>\n"
            + _table(cols + ["removed"], rows))


def _columns_table(kept: pd.DataFrame) -> str:
    numeric = [c for c in kept.columns
               if pd.api.types.is_numeric_dtype(kept[c]) and not pd.api.types.is_bool_dtype(kept[c])]
    if kept.empty or not numeric:
        return _no_data("no numeric columns")
    rows = []
    for c in numeric:
        v = pd.to_numeric(kept[c], errors="coerce").dropna().astype("float64")
        q = v.quantile([0.0, 0.05, 0.5, 0.95, 1.0]).to_numpy() if len(v) else [np.nan] * 5
        rows.append([_td(c), _td(len(v), "num")] + [_td(x, "num") for x in (v.mean(), *q)])
    return _table(["column", "count", "mean", "min", "p5", "median", "p95", "max"], rows)


# -- data ----------------------------------------------------------------------------------------
def _sample(df: pd.DataFrame) -> pd.DataFrame:
    return df.sample(HIST_SAMPLE, random_state=0) if len(df) > HIST_SAMPLE else df


def _lengths(df: pd.DataFrame) -> pd.Series | None:
    if "chars" in df:
        return pd.to_numeric(_sample(df)["chars"], errors="coerce").dropna()
    if "text" in df:
        return _sample(df)["text"].dropna().astype(str).str.len()
    return None


def _sizes(df: pd.DataFrame) -> pd.DataFrame | None:
    if not any(c in df for c in SIZE_COLUMNS):
        return None
    w, h = original_size(_sample(df)[[c for c in SIZE_COLUMNS if c in df]])
    return pd.DataFrame({"width": w, "height": h}).dropna()


def _histogram(ax: Any, series: dict[str, pd.Series], xlabel: str) -> None:
    """Overlaid histograms of each series on shared bins; log-spaced when the values span decades."""
    values = {label: np.asarray(v, dtype=float) for label, v in series.items()}
    every = np.concatenate(list(values.values()))
    lo, hi = float(every.min()), float(every.max())
    if lo >= 0 and hi > 100 * max(lo, 1):
        bins = np.logspace(np.log10(max(lo, 1)), np.log10(hi + 1), HIST_BINS)
        values = {label: np.maximum(v, 1) for label, v in values.items()}
        ax.set_xscale("log")
    else:
        bins = np.histogram_bin_edges(every, bins=HIST_BINS) if hi > lo else np.array([lo - 0.5, lo + 0.5])
    for label, v in values.items():
        color = KEPT_COLOR if label == "kept" else REMOVED_COLOR
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.55, color=color, label=f"{label} (n={len(v):,})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.legend()


# -- html ----------------------------------------------------------------------------------------
def _png(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _section(title: str, *parts: str) -> str:
    return f"<h2>{_esc(title)}</h2>\n" + "\n".join(parts)


def _no_data(why: str) -> str:
    return f'<p class="nodata">no data ({_esc(why)})</p>'


def _table(headers: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table from rows of `_td` cells (no header row when `headers` is None)."""
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr>\n" if headers else ""
    body = "".join("<tr>" + "".join(row) + "</tr>\n" for row in rows)
    return f"<table>\n{head}{body}</table>"


def _td(value: Any, kind: str = "") -> str:
    """One table cell, its value formatted and escaped; `kind` is "num" (right-aligned) or "key" (monospace)."""
    cls = f' class="{kind}"' if kind else ""
    return f"<td{cls}>{_esc(_fmt(value))}</td>"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)}m {seconds:04.1f}s" if minutes else f"{seconds:.1f}s"

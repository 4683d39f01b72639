"""``report.html``: one static page that opens offline (inline CSS and JS, nothing fetched from a network):
the interval, cost and paired tables (sortable by clicking a header), the figures (embedded as base64 PNG),
and the qualitative grids: the arms side by side on a subset of images (the first 8 unless ``--images``
chooses), each grid a PNG file beside the page that the browser loads lazily, so a page over hundreds of
images stays light."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_lab.report.analysis import Analysis, analyze
from ddim_lab.report.grids import QualGrid, qualitative_grids
from ddim_lab.report.tables import (
    COSTS_CAPTION,
    costs_display,
    intervals_display,
    intervals_markdown,
    paired_display,
    write_tables,
)
from ddim_lab.report.text import key_text
from ddim_lab.schema import IMAGE, label

REPORT_HTML = "report.html"
PER_IMAGE_METRICS = ("psnr", "ssim", "lpips", "latent_mse", "edit_success")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px}.note{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px;
margin:6px 0;font-size:13px}
table.sortable{border-collapse:collapse;font-size:12px;margin:6px 0}
table.sortable th,table.sortable td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
table.sortable th{background:#f3f3f3;cursor:pointer;user-select:none;position:sticky;top:0}
table.sortable th:hover{background:#e6e6e6}
table.sortable th.asc::after{content:" \\25B2"}table.sortable th.desc::after{content:" \\25BC"}
table.sortable td.t{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:560px;border:1px solid #eee}
.grid{overflow-x:auto;margin:6px 0}.grid img{border:1px solid #eee;max-width:none}
details{margin:4px 0 20px}summary{cursor:pointer;color:#555;font-size:13px}
.scroll{overflow:auto;max-height:520px}
"""

_JS = """
function cellValue(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;
 var n=parseFloat(v);return isNaN(n)||!/^\\s*[-+.0-9]/.test(v)?{n:false,v:v.toLowerCase()}:{n:true,v:n};}
function sortTable(th){var table=th.closest('table'),tbody=table.tBodies[0],idx=Array.prototype.indexOf.call(
 th.parentNode.children,th),asc=!th.classList.contains('asc');
 Array.prototype.forEach.call(th.parentNode.children,function(h){h.classList.remove('asc','desc');});
 th.classList.add(asc?'asc':'desc');var rows=Array.prototype.slice.call(tbody.rows);
 rows.sort(function(a,b){var x=cellValue(a.cells[idx]),y=cellValue(b.cells[idx]);
  if(x.n&&y.n)return asc?x.v-y.v:y.v-x.v; if(x.n!==y.n)return x.n?-1:1;
  return asc?(x.v<y.v?-1:x.v>y.v?1:0):(x.v<y.v?1:x.v>y.v?-1:0);});
 rows.forEach(function(r){tbody.appendChild(r);});}
document.addEventListener('click',function(e){var th=e.target.closest('table.sortable th');
 if(th)sortTable(th);});
/* #sort=<table id>:<column index>[:desc] sorts on load (a link to a sorted view; used by the tests) */
(function(){var m=/sort=([\\w-]+):(\\d+)(:desc)?/.exec(location.hash);if(!m)return;
 var t=document.getElementById(m[1]);if(!t)return;var th=t.tHead.rows[0].cells[+m[2]];if(!th)return;
 sortTable(th);if(m[3])sortTable(th);})();
"""


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _is_text(values: list[str]) -> bool:
    return not all(v == "n/a" or v[:1].isdigit() or v[:1] in "-." for v in values)


def html_table(shown: pd.DataFrame, sort_values: pd.DataFrame | None = None, table_id: str = "") -> str:
    """A sortable table of string cells; ``sort_values`` (same shape, numbers) are what clicking sorts by."""
    if shown.empty:
        return "<p class='meta'>(none)</p>"
    cols = list(shown.columns)
    text = {c: _is_text(shown[c].astype(str).tolist()) for c in cols}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for i, row in enumerate(shown.itertuples(index=False)):
        cells = []
        for j, value in enumerate(row):
            attr = ""
            if sort_values is not None and cols[j] in sort_values.columns:
                v = sort_values[cols[j]].iloc[i]
                if isinstance(v, int | float | np.number) and math.isfinite(float(v)):
                    attr = f" data-v='{float(v)!r}'"
            cls = " class='t'" if text[cols[j]] else ""
            cells.append(f"<td{cls}{attr}>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f" id='{table_id}'" if table_id else ""
    return (
        f"<div class='scroll'><table class='sortable'{ident}><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _interval_sort_values(analysis: Analysis, shown: pd.DataFrame) -> pd.DataFrame:
    """Numbers behind the interval table's cells (the means), so that clicking sorts numerically; the outcomes
    of groups scored by construction have none, so they sort after every measured group either way."""
    t = analysis.intervals
    values = pd.DataFrame(index=range(len(t)))
    values["#"] = np.arange(1, len(t) + 1, dtype=float)
    for k in analysis.keys:
        values[k] = pd.to_numeric(t[k], errors="coerce") if pd.api.types.is_numeric_dtype(t[k]) else None
    values["n"] = t["n"].astype(float)
    for m in [*analysis.metrics, *analysis.references, *analysis.costs]:
        values[label(m)] = t[f"{m}_mean"].astype(float)
    for m in analysis.metrics:
        values.loc[t["by_construction"].to_numpy(), label(m)] = np.nan
    return values


def _paired_sort_values(analysis: Analysis) -> pd.DataFrame:
    p = analysis.paired
    return pd.DataFrame(
        {
            "pairs": p["pairs"].astype(float),
            "baseline mean": p["baseline_mean"].astype(float),
            "other mean": p["other_mean"].astype(float),
            "Δ mean [CI]": p["diff_mean"].astype(float),
            "p (Wilcoxon)": p["p_wilcoxon"].astype(float),
        }
    )


def rows_table(analysis: Analysis, images: list[str], arms: dict[str, str]) -> str:
    """The rows of ``images`` (image order, then run order): arm, image, the varying keys and main metrics."""
    df = analysis.rows
    rows = df[df[IMAGE].astype(str).isin(images)]
    order = {image: n for n, image in enumerate(images)}
    rows = rows.iloc[np.argsort([order[i] for i in rows[IMAGE].astype(str)], kind="stable")]
    metrics = [m for m in PER_IMAGE_METRICS if m in analysis.metrics]
    shown = pd.DataFrame(index=range(len(rows)))
    if arms and "run_dir" in rows.columns:
        shown["arm"] = [arms.get(str(r), "") for r in rows["run_dir"]]
    cols = [c for c in [IMAGE, *analysis.keys] if c in rows.columns]
    for c in cols:
        shown[c] = [key_text(c, v) for v in rows[c]]
    values = pd.DataFrame(index=range(len(rows)))
    for m in metrics:
        numbers = pd.to_numeric(rows[m], errors="coerce").astype(float)
        shown[label(m)] = [key_text(m, v) for v in numbers]
        values[label(m)] = numbers.to_numpy()
    for c in cols:
        if pd.api.types.is_numeric_dtype(rows[c]):
            values[c] = pd.to_numeric(rows[c], errors="coerce").astype(float).to_numpy()
    return html_table(shown, values)


def grids_html(analysis: Analysis, grids: list[QualGrid], out_dir: Path | None) -> list[str]:
    """The grids section: each picture loaded lazily from its file beside the page, the arms' legend, and
    each subset's rows (folded)."""
    esc = html.escape
    all_images = list(dict.fromkeys(analysis.rows[IMAGE].astype(str))) if IMAGE in analysis.rows else []
    parts = ["<h2 id='grids'>Images</h2>"]
    if not grids:
        parts.append(
            "<p class='meta'>(no saved grids: the runs saved none, or the chosen images are in no row)</p>"
        )
        return parts
    shown = list(dict.fromkeys(i for g in grids for i in g.images))
    parts.append(
        f"<p class='meta'>{len(shown)} of {len(all_images)} images (choose others with "
        f"<code>--images id1,id2</code>). Columns: the input and VAE round-trip once (a run of another model "
        "has its own), then each arm's results, PSNR under each tile.</p>"
    )
    arms = {a.name: a for g in grids for a in g.arms}
    legend = pd.DataFrame(
        {
            "arm": list(arms),
            "run": [a.run.run_dir for a in arms.values()],
            "settings": [a.caption or "(the only run)" for a in arms.values()],
            "columns": [", ".join(a.labels) for a in arms.values()],
        }
    )
    parts.append(html_table(legend, table_id="arms"))
    run_arm = {a.run.run_dir: a.name for a in arms.values()}
    for g in grids:
        src = g.path.name if out_dir is None else Path(g.path).relative_to(out_dir).as_posix()
        first, last = all_images.index(g.images[0]) + 1, all_images.index(g.images[-1]) + 1
        names = ", ".join(a.name for a in g.arms)
        parts.append(
            f"<h3>images {first}–{last} · arms {esc(names)}</h3><div class='grid'>"
            f"<img loading='lazy' decoding='async' src='{esc(src)}' width='{g.width}' height='{g.height}' "
            f"alt='grid of {esc(', '.join(g.images))}'></div>"
            "<details><summary>rows of these images</summary>"
            f"{rows_table(analysis, g.images, run_arm)}</details>"
        )
    return parts


def render_html(
    analysis: Analysis,
    figures: list[Path] = (),
    grids: list[QualGrid] = (),
    problems: list[str] | None = None,
    title: str = "ddim_lab report",
    out_dir: Path | None = None,
) -> str:
    """The page as one string. ``grids``: the qualitative grids, PNG files beside the page (in ``out_dir``)."""
    df = analysis.rows
    n_images = df[IMAGE].nunique() if IMAGE in df.columns else 0
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='meta'>rows: {len(df)} · runs: {df['run_dir'].nunique() if 'run_dir' in df else 1} · "
        f"images: {n_images} · grouped by: {esc(', '.join(analysis.keys) or 'nothing (one group)')} · "
        f"{esc(analysis.settings.describe())}. Click a column header to sort.</p>",
        *(f"<div class='note'>{esc(n)}</div>" for n in analysis.notes),
        *(f"<div class='note'>job: {esc(p)}</div>" for p in (problems or [])),
        "<h2>Means with bootstrap intervals</h2>",
    ]
    shown = intervals_display(analysis)
    parts.append(html_table(shown, _interval_sort_values(analysis, shown), "intervals"))
    costs = costs_display(analysis)
    if not costs.empty:
        parts.append("<h2>What each arm spent</h2>")
        parts.append(f"<p class='meta'>{esc(COSTS_CAPTION.replace('`', ''))}</p>")
        parts.append(html_table(costs, _interval_sort_values(analysis, costs), "costs"))
    if analysis.compare is not None:
        parts.append(f"<h2>Paired comparisons of {esc(analysis.compare)} on the same images</h2>")
        parts.append(
            "<p class='meta'>Δ = other − baseline per image; interval: bootstrap of the differences; "
            "p: two-sided Wilcoxon signed-rank. Outcome metrics only (costs are in the table above).</p>"
        )
        paired = paired_display(analysis)
        parts.append(html_table(paired, _paired_sort_values(analysis) if not paired.empty else None, "paired"))
    if figures:
        parts.append("<h2>Figures</h2><div class='figs'>")
        parts += [f"<img alt='{esc(Path(f).name)}' src='{_png_data_uri(f)}'>" for f in figures]
        parts.append("</div>")
    parts += grids_html(analysis, list(grids), out_dir)
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def write_html(analysis: Analysis, out_dir: Path, **kwargs) -> Path:
    from ddim_lab.study.records import atomic_write

    text = render_html(analysis, out_dir=Path(out_dir), **kwargs)
    return atomic_write(Path(out_dir) / REPORT_HTML, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_outputs(
    df: pd.DataFrame,
    root: Path,
    out_dir: Path,
    settings=None,
    compare: str | None = None,
    baseline=None,
    figures: bool = False,
    page: bool = False,
    images: list[str] | None = None,
    problems: list[str] | None = None,
    append_markdown: Path | None = None,
) -> tuple[Analysis, list[Path]]:
    """Everything beyond the merged table, from the saved rows ``df``: interval, cost and paired tables, and on
    request the figures, the qualitative grids and the page.

    Grids (``qual_NN.png``) are drawn for ``images`` when given, and for the page's default subset (the first
    :data:`~ddim_lab.report.grids.PER_GRID` images) when ``page`` and no ``images``.
    ``append_markdown``: a markdown report (``report.md``) to which the interval and paired section is added.
    Returns the analysis and the files written."""
    from ddim_lab.report.figures import metric_figures, pareto_figures
    from ddim_lab.report.stats import DEFAULT
    from ddim_lab.study.records import atomic_write

    analysis = analyze(df, settings or DEFAULT, compare=compare, baseline=baseline)
    written = write_tables(analysis, out_dir)
    if append_markdown is not None:
        text = Path(append_markdown).read_text(encoding="utf-8") if Path(append_markdown).exists() else ""
        text = text.rstrip("\n") + "\n\n" + intervals_markdown(analysis)
        atomic_write(Path(append_markdown), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plots: list[Path] = []
    grids: list[QualGrid] = []
    if figures or page:
        plots = metric_figures(analysis, out_dir) + pareto_figures(analysis, out_dir)
    if images or page:
        grids = qualitative_grids(analysis.rows, root, images or None, out_dir, analysis.keys)
    written += plots + [g.path for g in grids]
    if page:
        written.append(write_html(analysis, out_dir, figures=plots, grids=grids, problems=problems))
    return analysis, written

"""The self-contained HTML report: one file, images embedded as base64 PNG, no external resources.

Sections: header (inputs, counts), problems, per-structure summary table, box/strip plots, a
sortable per-case table (worst Dice first; click a header to sort), overlays of the worst cases,
and the metric conventions.  The page's only script sorts the table; it sets ``data-ready="1"`` on
``<body>`` when it has run, so a headless browser test can check it executed, and ``data-overflow``
to the ids of tables that need horizontal scrolling at the window's width (none at 1300 px: headers
wrap, compound cells such as ``median [IQR]`` may wrap, the tables take the page width).  Overlays
show reference contours solid sky blue and prediction contours dashed orange, with a legend.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px auto;max-width:1400px;
color:#1d2733;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccd;padding-bottom:.2em}
.meta{color:#555;font-size:.9em}.big{font-size:1.25em}
table{border-collapse:collapse;font-size:.8em;margin:0;width:100%}
th,td{border:1px solid #d5dbe3;padding:2px 5px;text-align:right;white-space:nowrap}
th{background:#eef2f7;position:sticky;top:0;white-space:normal;vertical-align:bottom}
td.t,th.t{text-align:left}td.w{white-space:normal}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#99a}
table.sortable th.asc:after{content:" \\2191";color:#333}table.sortable th.desc:after{content:" \\2193";color:#333}
.scroll{max-height:620px;overflow:auto;border:1px solid #d5dbe3;margin:.6em 0;max-width:100%}
.problems{background:#fff4f2;border:1px solid #e8b4a8;padding:8px 14px}
.problems li{margin:.2em 0}.ok{background:#f1f8f2;border:1px solid #b5d8bb;padding:8px 14px}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #d5dbe3}figcaption{color:#444;font-size:.9em}
.na{color:#999}.conv{font-size:.85em;color:#333;max-width:1100px}
"""

_JS = """
(function(){
  function key(cell){
    var v=cell.getAttribute('data-v');
    if(v===null){return cell.textContent.toLowerCase();}
    if(v==='nan'||v===''){return null;}
    if(v==='inf'){return Infinity;}
    return parseFloat(v);
  }
  function sortBy(table,col,dir){
    var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=key(a.cells[col]),y=key(b.cells[col]);
      if(x===null&&y===null){return 0;}if(x===null){return 1;}if(y===null){return -1;}
      if(x<y){return -dir;}if(x>y){return dir;}return 0;
    });
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.classList.remove('asc','desc');if(i===col){th.classList.add(dir>0?'asc':'desc');}
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.addEventListener('click',function(){sortBy(table,i,th.classList.contains('asc')?-1:1);});
    });
    var first=parseInt(table.getAttribute('data-sort-col')||'-1',10);
    if(first>=0){sortBy(table,first,1);}
  });
  var wide=[];
  Array.prototype.forEach.call(document.querySelectorAll('.scroll'),function(box){
    if(box.scrollWidth>box.clientWidth+1){var t=box.querySelector('table');wide.push(t?t.id:'?');}
  });
  document.body.setAttribute('data-overflow',wide.join(','));
  document.body.setAttribute('data-ready','1');
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return '<span class="na">n/a</span>'
    v = float(value)
    if math.isnan(v):
        return '<span class="na">n/a</span>'
    if math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def _data_value(value: Any) -> str:
    if value is None or value == "":
        return "nan"
    v = float(value)
    if math.isnan(v):
        return "nan"
    return "inf" if math.isinf(v) else repr(v)


def _stat(stats: Mapping[str, Any] | None, digits: int = 3, *, iqr: bool = False) -> str:
    if stats and not stats.get("n") and stats.get("n_inf"):
        return f"∞ ({stats['n_inf']}x)"  # only infinite values: one side empty in every case
    if not stats or stats.get("mean") is None:
        return '<span class="na">n/a</span>'
    if iqr:
        return f"{_num(stats['median'], digits)} [{_num(stats['q1'], digits)}, {_num(stats['q3'], digits)}]"
    sd = stats.get("std")
    return _num(stats["mean"], digits) + ("" if sd is None else f" ± {_num(sd, digits)}")


def _dice_colour(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(v):
        return ""
    hue = int(120 * max(0.0, min(1.0, v)))  # red (0) -> green (1)
    return f' style="background:hsl({hue},70%,88%)"'


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html(
    summary: Mapping[str, Any],
    rows: Sequence[dict[str, Any]],
    *,
    plots_png: bytes | None,
    overlays: Sequence[tuple[str, bytes, str]] = (),
) -> str:
    """The report page.

    Args:
        summary: The JSON summary (NaN already ``None``).
        rows: Per case x structure rows.
        plots_png: Box/strip plot image, or ``None``.
        overlays: ``(case id, png bytes, caption)`` of the worst cases, worst first.

    Returns:
        The HTML document.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Segmentation evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Segmentation evaluation</h1>",
        _header(summary),
        _problems(summary),
        "<h2>Per structure</h2>",
        _summary_table(summary),
    ]
    if plots_png is not None:
        parts += [
            "<h2>Distribution over cases</h2>",
            f'<figure><img alt="Dice and HD95 per structure" src="{_png(plots_png)}">',
            "<figcaption>Boxes: quartiles and median (red); dots: cases; crosses: one side empty "
            "(infinite distance).</figcaption></figure>",
        ]
    parts += ["<h2>Per case</h2>", _case_table(rows)]
    if overlays:
        parts.append("<h2>Worst cases</h2>")
        parts.append(
            '<p class="meta">Cases with the lowest mean class Dice (cases without any error are not shown). Axial, '
            "coronal and sagittal slices through the point where the Hausdorff distance of the case's worst class is "
            'attained (white cross); <span style="color:#2a7fb8">reference contours solid sky blue</span>, '
            '<span style="color:#b07800">prediction contours dashed orange</span>, the worst class thick; '
            "radiological orientation (patient right on the left); true aspect ratio from the voxel spacing.</p>"
        )
        for case_id, png, caption in overlays:
            parts.append(
                f'<figure id="overlay-{_e(case_id)}"><img alt="overlay of {_e(case_id)}" src="{_png(png)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    parts += [
        "<h2>Conventions</h2>",
        f'<p class="conv">{_e(summary.get("conventions", ""))}</p>',
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _header(summary: Mapping[str, Any]) -> str:
    options = summary.get("options", {})
    inputs = summary.get("inputs", {})
    lines = [
        f'<p class="big">{_e(summary.get("n_cases", 0))} case(s) evaluated; mean foreground Dice '
        f"<b>{_num(summary.get('mean_foreground_dice'), 4)}</b>.</p>",
        '<p class="meta">',
        f"Prediction: <code>{_e(inputs.get('prediction', ''))}</code><br>",
        f"Reference: <code>{_e(inputs.get('reference', ''))}</code><br>",
    ]
    if options:
        lines.append(
            f"NSD tolerance {_e(options.get('tolerance_mm'))} mm; HD percentile {_e(options.get('percentile'))}; "
            f"lesion connectivity {_e(options.get('connectivity'))}; lesion match IoU &gt; "
            f"{_e(options.get('match_iou'))}; prediction resampled to reference: "
            f"{'yes' if options.get('resample_to_ref') else 'no'}.<br>"
        )
    lines.append(
        "Files: <a href='metrics.csv'>metrics.csv</a>, <a href='lesions.csv'>lesions.csv</a>, "
        "<a href='summary.json'>summary.json</a>, <a href='report.md'>report.md</a></p>"
    )
    return "".join(lines)


def _problems(summary: Mapping[str, Any]) -> str:
    problems = summary.get("problems") or []
    warnings = summary.get("warnings") or []
    if not problems and not warnings:
        return '<div class="ok">No input problems.</div>'
    out = []
    if problems:
        out.append(f'<h2>Problems ({len(problems)})</h2><div class="problems"><ul>')
        for p in problems:
            case = f"<b>{_e(p.get('case'))}</b>: " if p.get("case") else ""
            out.append(f"<li>{case}[{_e(p.get('kind'))}] {_e(p.get('message'))}</li>")
        out.append("</ul></div>")
    if warnings:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    return "".join(out)


def _summary_table(summary: Mapping[str, Any]) -> str:
    header = [
        "Structure",
        "Cases",
        "Dice mean ± sd",
        "Dice median [IQR]",
        "HD95 mm median [IQR]",
        "HD mm median",
        "ASSD mm mean ± sd",
        "NSD mean ± sd",
        "Vol. diff mL mean ± sd",
        "Lesions sens. / prec. / F1",
        "PQ mean",
        "Both empty",
        "One side empty",
    ]
    heads = "".join(f'<th class="{"t" if i == 0 else ""}">{h}</th>' for i, h in enumerate(header))
    out = [f'<div class="scroll"><table id="structures"><thead><tr>{heads}</tr></thead><tbody>']
    absent = []
    for group in ("classes", "regions"):
        for name, entry in (summary.get(group) or {}).items():
            if entry.get("n_empty_both", 0) == entry.get("n_cases", 0):
                absent.append(str(name))
                continue
            lesions = entry.get("lesions") or {}
            det = " / ".join(_num(lesions.get(k)) for k in ("sensitivity", "precision", "f1")) if lesions else "n/a"
            label = f"{_e(name)}" + (" <i>(region)</i>" if group == "regions" else f" ({_e(entry.get('label'))})")
            one_side = entry.get("hd95_mm", {}).get("n_inf", 0) if entry.get("hd95_mm") else 0
            cells = [
                f'<td class="t">{label}</td>',
                f"<td>{_e(entry.get('n_cases'))}</td>",
                f"<td{_dice_colour((entry.get('dice') or {}).get('mean'))}>{_stat(entry.get('dice'))}</td>",
                f"<td>{_stat(entry.get('dice'), iqr=True)}</td>",
                f"<td>{_stat(entry.get('hd95_mm'), 2, iqr=True)}</td>",
                f"<td>{_num((entry.get('hd_mm') or {}).get('median'), 2)}</td>",
                f"<td>{_stat(entry.get('assd_mm'), 2)}</td>",
                f"<td>{_stat(entry.get('nsd'))}</td>",
                f"<td>{_stat(entry.get('volume_diff_ml'), 2)}</td>",
                f'<td class="w">{det}</td>',
                f"<td>{_num((entry.get('pq') or {}).get('mean'))}</td>",
                f"<td>{_e(entry.get('n_empty_both', 0))}</td>",
                f"<td>{_e(one_side)}</td>",
            ]
            out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if absent:
        out.append(
            f'<p class="meta">Absent from every reference and prediction ({len(absent)}, not shown): '
            f"{_e(', '.join(absent))}.</p>"
        )
    return "".join(out)


_CASE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("dice", "Dice", 3),
    ("hd95_mm", "HD95 mm", 2),
    ("hd_mm", "HD mm", 2),
    ("assd_mm", "ASSD mm", 2),
    ("nsd", "NSD", 3),
    ("iou", "IoU", 3),
    ("precision", "Precision", 3),
    ("recall", "Recall", 3),
    ("ref_volume_ml", "Ref mL", 2),
    ("pred_volume_ml", "Pred mL", 2),
    ("volume_diff_ml", "Diff mL", 2),
    ("lesion_tp", "Lesion TP", 0),
    ("lesion_fn", "Lesion FN", 0),
    ("lesion_fp", "Lesion FP", 0),
    ("pq", "PQ", 3),
)


def _case_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No case was evaluated.</p>"
    ordered = sorted((r for r in rows if r["ref_voxels"] or r["pred_voxels"]), key=_worst_first)
    hidden = len(rows) - len(ordered)
    head = '<th class="t">Case</th><th class="t">Structure</th>' + "".join(f"<th>{t}</th>" for _, t, _ in _CASE_COLUMNS)
    out = [
        '<div class="scroll"><table class="sortable" id="cases" data-sort-col="2">',
        f"<thead><tr>{head}</tr></thead><tbody>",
    ]
    for row in ordered:
        name = _e(row["name"]) + (" <i>(region)</i>" if row.get("kind") == "region" else "")
        cells = [f'<td class="t">{_e(row["case"])}</td>', f'<td class="t">{name}</td>']
        for column, _, digits in _CASE_COLUMNS:
            value = row.get(column)
            colour = _dice_colour(value) if column in ("dice", "nsd") else ""
            cells.append(f'<td data-v="{_data_value(value)}"{colour}>{_num(value, digits)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if hidden:
        out.append(
            f'<p class="meta">{hidden} case/structure pair(s) empty in both reference and prediction not shown.</p>'
        )
    return "".join(out)


def _worst_first(row: dict[str, Any]) -> tuple[int, float, str, str]:
    value = row.get("dice")
    v = float(value) if value is not None else math.nan
    return (1 if math.isnan(v) else 0, v if not math.isnan(v) else 0.0, str(row["case"]), str(row["name"]))

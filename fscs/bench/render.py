"""Writers of the report: the self-contained index.html and LEADERBOARD.md, from tables and pictures."""
from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence

from fscs.bench import plots
from fscs.bench.figures import Picture
from fscs.bench.report import MEAN_CI_METHOD, PUBLISHED_SOURCE, Table
from fscs.bench.report_inputs import Result

COLUMNS = (("model", "model"), ("train", "train regime"), ("test", "test regime"), ("backbone", "backbone"),
           ("fold", "fold"), ("er", "ER [95% CI]"), ("miou", "mIoU [95% CI]"), ("fbiou", "FB-IoU [95% CI]"),
           ("episodes", "episodes"), ("manifest", "manifest"))
"""(row key, header) of every leaderboard column, in order."""
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
color:#1d1d1f;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;white-space:nowrap}
th{background:#f3f3f5}tr.mean td{font-weight:600;background:#f7fbff}
tr.published td{background:#fff8e6;font-style:italic}
.badge{display:inline-block;background:#e8a317;color:#fff;border-radius:3px;padding:0 .35em;font-size:.8em;
font-style:normal;margin-left:.3em}
.note{color:#555;font-size:.85em}code{background:#f3f3f5;padding:0 .2em}
figure{margin:.6em 0;display:inline-block;vertical-align:top}
figure.plot img{max-width:100%;border:1px solid #eee}
figure.panel{margin:.4em;max-width:560px}figure.panel img{image-rendering:pixelated;border:1px solid #ccc}
figcaption{font-size:.78em;color:#444;max-width:560px;white-space:normal}
.legend span{display:inline-block;padding:0 .5em;margin-right:.4em;border-radius:3px;color:#fff}
"""


def _h(x: object) -> str:
    return html.escape(str(x), quote=True)


def _md(x: object) -> str:
    """Text safe in a Markdown table cell (pipes, angle brackets, newlines)."""
    return (str(x).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def _img(pic: Picture, cls: str) -> str:
    data = base64.b64encode(pic.png).decode("ascii")
    return f'<img class="{cls}" alt="{_h(pic.title)}" src="data:image/png;base64,{data}">'


def render_html(title: str, tables: Sequence[Table], plot_pics: dict[str, list[Picture]],
                panel_pics: dict[tuple[str, str], list[Picture]], sources: Sequence[Result]) -> str:
    """The self-contained page: inline CSS, images as data: URIs, every text escaped."""
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>'
             f'<style>{CSS}</style></head><body><h1>{_h(title)}</h1>',
             f'<p class="note">{len(sources)} results · generated {_h(time.strftime("%Y-%m-%d %H:%M:%S"))} · '
             f'cells: value [95 % CI]; fold rows: bootstrap over that fold\'s episodes; "mean of k" rows: '
             f'{_h(MEAN_CI_METHOD)}. Rows marked <span class="badge">published</span> are copied from '
             f'{_h(PUBLISHED_SOURCE)}, not measured here.</p>']
    legend = "".join(f'<span style="background:rgb{c}">way {k}</span>'
                     for k, c in enumerate(plots.PALETTE[:4], 1))
    for dataset in sorted({t.dataset for t in tables}):
        parts.append(f'<section class="dataset" data-dataset="{_h(dataset)}"><h2>{_h(dataset)}</h2>')
        for t in (t for t in tables if t.dataset == dataset):
            parts.append(f'<h3>{_h(dataset)} · {_h(t.setting)}</h3><p class="note">{_h(t.note)}</p>'
                         f'<table class="leaderboard" data-setting="{_h(t.setting)}"><thead><tr>'
                         + "".join(f"<th>{_h(h)}</th>" for _, h in COLUMNS) + "</tr></thead><tbody>")
            for row in t.rows:
                cells = []
                for key, _ in COLUMNS:
                    v = _h(row.cells.get(key, ""))
                    if key == "model" and row.kind == "published":
                        v += '<span class="badge">published</span>'
                    cells.append(f"<td>{v}</td>")
                parts.append(f'<tr class="result-row {row.kind}" data-kind="{row.kind}" '
                             f'title="{_h(row.title)}">' + "".join(cells) + "</tr>")
            parts.append("</tbody></table>")
        parts.append("<h3>Plots</h3>")
        for pic in plot_pics.get(dataset, []):
            parts.append(f'<figure class="plot" data-name="{_h(pic.name)}">{_img(pic, "plot")}'
                         f"<figcaption>{_h(pic.title)} — {_h(pic.caption)}</figcaption></figure>")
        parts.append('<h3>Episodes</h3><p class="note legend">query · ground truth · pseudo-mask · '
                     f"prediction; grey = ignored boundary. {legend}</p>")
        for (ds, setting), pics in panel_pics.items():
            if ds != dataset or not pics:
                continue
            parts.append(f"<h4>{_h(setting)}</h4><div class=\"panels\">")
            for pic in pics:
                parts.append(f'<figure class="panel">{_img(pic, "panel")}<figcaption><b>{_h(pic.title)}'
                             f"</b><br>{_h(pic.caption)}</figcaption></figure>")
            parts.append("</div>")
        parts.append("</section>")
    items = "".join(f"<li><code>{_h(r.path)}</code> · manifest "
                    f"<code>{_h(r.data['manifest_hash'])}</code></li>"
                    for r in sorted(sources, key=lambda r: str(r.path)))
    parts.append(f'<h2>Sources</h2><ul class="sources">{items}</ul></body></html>\n')
    return "".join(parts)


def render_markdown(title: str, tables: Sequence[Table], plot_pics: dict[str, list[Picture]],
                    panel_pics: dict[tuple[str, str], list[Picture]]) -> str:
    """LEADERBOARD.md: the same tables; figures and panels linked from figures/ and panels/."""
    lines = [f"# {_md(title)}", "",
             "Cells: value [95 % CI]. Fold rows: percentile bootstrap over that fold's episodes. "
             f"\"mean of k\" rows: {MEAN_CI_METHOD}. Rows marked *published* are copied from "
             f"{PUBLISHED_SOURCE}, not measured here.", ""]
    for dataset in sorted({t.dataset for t in tables}):
        lines += [f"## {_md(dataset)}", ""]
        for t in (t for t in tables if t.dataset == dataset):
            lines += [f"### {_md(dataset)} · {t.setting}", "", f"_{_md(t.note)}_", "",
                      "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            for row in t.rows:
                cells = [_md(row.cells.get(k, "")) for k, _ in COLUMNS]
                if row.kind == "mean":
                    cells = [f"**{c}**" if c else c for c in cells]
                elif row.kind == "published":
                    cells = [f"*{c}*" if c and c != "—" else c for c in cells]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Plots", ""]
        lines += [f"![{_md(p.title)}](figures/{p.name})" for p in plot_pics.get(dataset, [])]
        lines += ["", "### Episodes (query · ground truth · pseudo-mask · prediction)", ""]
        for (ds, setting), pics in panel_pics.items():
            if ds == dataset and pics:
                lines += [f"#### {setting}", ""]
                lines += [f"- {_md(p.title)}: {_md(p.caption)}  \n  ![panel](panels/{p.name})" for p in pics]
                lines.append("")
    return "\n".join(lines) + "\n"

"""The HTML report: one self-contained page (inline CSS and SVG plots drawn here, no script, no network).

Two pages share the same parts: :func:`compare_page` (``onnxshrink compare --report x.html``) and
:func:`optimize_page` (``onnxshrink optimize --report x.html``: the pipeline and per-pass table of the
:class:`~onnxshrink.report.Report`, plus the comparison of the input and the result). A separate module
from ``report.py`` because it is a renderer of two result types (``Report`` and ``CompareResult``) and
its page template and plot code would double the size of ``report.py``.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

from onnxshrink.compare import HIST_EDGES, CompareResult
from onnxshrink.compare import _g as _fmt_g
from onnxshrink.compare import _pct as _fmt_pct
from onnxshrink.report import Report, _human_bytes

__all__ = ["compare_page", "optimize_page"]

BEFORE, AFTER, BAD, GOOD, INK, GRID, MUTED = "#8aa4c8", "#2f6db5", "#d1495b", "#2a9d68", "#1f2933", "#e4e7eb", "#616e7c"
#: Added relative L2 below this is float rounding (fold's own tolerance): never highlighted as a culprit.
NOISE = 1e-5


def hot_layers(layers: list[Any], top: int = 3) -> list[Any]:
    """The layers to point at: the ``top`` ranked by added error, if it is above float noise and at least a
    quarter of the largest added error."""
    ranked = sorted(layers, key=lambda x: x.rank)
    if not ranked or not ranked[0].added_rel_l2 > NOISE:
        return []
    lead = ranked[0].added_rel_l2
    return [x for x in ranked[:top] if x.added_rel_l2 > NOISE and x.added_rel_l2 >= lead / 4]

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --card:#fff; --good:#2a9d68; --bad:#d1495b;
        --warn:#c98a00; --accent:#2f6db5; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
       "Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 32px 60px; }
header h1 { font-size:22px; margin:0 0 4px; letter-spacing:-.01em; }
header .paths { color:var(--muted); font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px;
                word-break:break-all; }
.badge { display:inline-block; padding:2px 10px; border-radius:999px; font-weight:600; font-size:12px;
         text-transform:uppercase; letter-spacing:.04em; vertical-align:3px; margin-left:8px; color:#fff; }
.badge.passed { background:var(--good); } .badge.failed { background:var(--bad); }
.badge.skipped, .badge.not-run { background:var(--warn); }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(200px,1fr)); gap:14px; margin:20px 0 8px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
.card .v { font-size:22px; font-weight:650; margin-top:2px; }
.card .s { color:var(--muted); font-size:12.5px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 20px; margin-top:18px; }
section h2 { font-size:16px; margin:0 0 12px; }
section p.lead { color:var(--muted); margin:-6px 0 12px; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { padding:6px 8px; border-bottom:1px solid var(--line); text-align:right; vertical-align:top; }
th { background:#f0f2f5; font-weight:600; color:#3e4c59; }
.tw { overflow-x:auto; }
td { white-space:nowrap; }
th:first-child, td:first-child, td.l, th.l { text-align:left; white-space:normal; }
td.mono { min-width:150px; }
td.mono, code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12px; word-break:break-all; }
tr.hot td { background:#fdf0f2; }
.ok { color:var(--good); font-weight:600; } .no { color:var(--bad); font-weight:600; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; }
@media (max-width: 900px) { .grid2 { grid-template-columns:1fr; } }
svg.plot { width:100%; height:auto; display:block; }
svg text { font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif; }
.legend { color:var(--muted); font-size:12px; margin-top:4px; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin:0 4px 0 12px; vertical-align:-1px; }
pre { background:#f0f2f5; padding:10px 12px; border-radius:8px; overflow-x:auto; margin:0;
      font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; white-space:pre-wrap; word-break:break-all; }
ul.notes { margin:0; padding-left:18px; color:var(--muted); }
footer { color:var(--muted); font-size:12px; margin-top:24px; text-align:center; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _g(x: float | None, digits: int = 3) -> str:
    return _fmt_g(x, digits, dash="–")


def _pct(x: float | None) -> str:
    return _fmt_pct(x, dash="–")


def _table(cols: list[str], rows: Iterable[list[str]], *, table_id: str, raw: bool = False,
           hot: set[int] | None = None, left: set[int] | None = None) -> str:
    """An HTML table; cells are escaped unless ``raw``. ``hot`` rows are highlighted."""
    left = left or {0}
    head = "".join(f'<th class="{"l" if i in left else ""}">{_e(c)}</th>' for i, c in enumerate(cols))
    body = []
    for ri, r in enumerate(rows):
        cells = "".join(f'<td class="{"l mono" if i in left else ""}">{c if raw else _e(c)}</td>' for i, c in enumerate(r))
        body.append(f'<tr class="{"hot" if hot and ri in hot else ""}">{cells}</tr>')
    return (f'<div class="tw"><table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _svg(plot_id: str, w: int, h: int, title: str, body: str) -> str:
    return (f'<svg class="plot" id="{_e(plot_id)}" viewBox="0 0 {w} {h}" role="img" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>{body}</svg>')


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 11, color: str = MUTED,
          weight: str = "normal", rotate: float | None = None) -> str:
    rot = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{color}" text-anchor="{anchor}" '
            f'font-weight="{weight}"{rot}>{_e(s)}</text>')


# -- plots ----------------------------------------------------------------------------------------


def bars_before_after(plot_id: str, title: str, items: list[tuple[str, float, float]], fmt=_human_bytes) -> str:
    """Horizontal grouped bars: one row per label, before (light) and after (dark)."""
    items = items[:12]
    w, row, left, right = 560, 34, 150, 90
    h = 24 + row * max(1, len(items))
    top = max([max(b, a) for _, b, a in items] + [1])
    body = []
    for i, (label, b, a) in enumerate(items):
        y = 14 + i * row
        body.append(_text(left - 8, y + 15, label if len(label) <= 22 else label[:21] + "…", anchor="end",
                          size=12, color=INK))
        for j, (v, color) in enumerate(((b, BEFORE), (a, AFTER))):
            bw = (w - left - right) * v / top
            yy = y + 3 + j * 12
            body.append(f'<rect x="{left}" y="{yy}" width="{max(bw, 0.5):.1f}" height="10" rx="2" fill="{color}"/>')
            body.append(_text(left + bw + 6, yy + 9, fmt(int(v)) if fmt else f"{v:g}", size=10))
    return _svg(plot_id, w, h, title, "".join(body))


def histogram(plot_id: str, title: str, counts: list[int], edges: list[float]) -> str:
    """Vertical bars over log10 bins (edges are HIST_EDGES): how many samples had each error level."""
    w, h, left, bottom, top = 520, 190, 40, 44, 12
    n = len(counts)
    if n == 0:
        return _svg(plot_id, w, 40, title, _text(10, 24, "no samples"))
    peak = max(counts + [1])
    bw = (w - left - 10) / n
    body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="{GRID}"/>']
    for i, c in enumerate(counts):
        bh = (h - bottom - top) * c / peak
        x = left + i * bw
        hi = edges[i + 1]
        color = BAD if hi > 1e-2 and c else AFTER
        body.append(f'<rect x="{x + 2:.1f}" y="{h - bottom - bh:.1f}" width="{bw - 4:.1f}" height="{bh:.1f}" '
                    f'rx="2" fill="{color}"><title>{c} sample(s) in [{_g(edges[i])}, {_g(hi)})</title></rect>')
        if c:
            body.append(_text(x + bw / 2, h - bottom - bh - 3, str(c), anchor="middle", size=10, color=INK))
        lo_lab = "0" if edges[i] == 0 else f"1e{int(round(math.log10(edges[i])))}"
        body.append(_text(x + bw / 2, h - bottom + 14, f"≥{lo_lab}" if edges[i] else "<1e-8", anchor="middle",
                          size=9))
    body.append(_text(w / 2, h - 8, "per-sample relative L2 error (log bins)", anchor="middle", size=11))
    body.append(_text(12, (h - bottom) / 2 + 10, "samples", anchor="middle", size=11, rotate=-90))
    return _svg(plot_id, w, h, title, "".join(body))


def layer_plot(plot_id: str, title: str, layers: list[Any], top: int = 3) -> str:
    """Per-layer relative L2 in graph order (log scale): a line of the error at each layer and bars of
    the error each layer adds; the ``top`` layers by added error are red and labelled."""
    layers = sorted(layers, key=lambda x: x.match.index)
    hot_list = hot_layers(layers, top)
    w, h, left, right, bottom = 1080, 300, 64, 20, 70
    tp = 14 + 15 * len(hot_list)  # a band above the plot for the culprits' labels
    if not layers:
        return _svg(plot_id, w, 60, title, _text(10, 30, "no matched layers"))
    vals = [x.rel_l2 for x in layers if math.isfinite(x.rel_l2) and x.rel_l2 > 0]
    vals += [x.added_rel_l2 for x in layers if math.isfinite(x.added_rel_l2) and x.added_rel_l2 > 0]
    lo = math.floor(math.log10(min(vals))) if vals else -8
    hi = math.ceil(math.log10(max(vals))) if vals else 0
    lo, hi = max(lo, -12), max(hi, lo + 1)

    def y(v: float) -> float:
        if not math.isfinite(v):
            return tp
        v = max(v, 10.0 ** lo)
        return tp + (h - tp - bottom) * (hi - math.log10(v)) / (hi - lo)

    n = len(layers)
    step = (w - left - right) / n
    body = []
    for e in range(lo, hi + 1):
        yy = y(10.0 ** e)
        body.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{w - right}" y2="{yy:.1f}" stroke="{GRID}"/>')
        body.append(_text(left - 6, yy + 4, f"1e{e}", anchor="end", size=10))
    hot = {id(x) for x in hot_list}
    for i, x in enumerate(layers):
        cx = left + (i + 0.5) * step
        if x.added_rel_l2 > 0:
            yy = y(x.added_rel_l2)
            color = BAD if id(x) in hot else BEFORE
            body.append(f'<rect x="{cx - step * 0.35:.1f}" y="{yy:.1f}" width="{step * 0.7:.1f}" '
                        f'height="{h - bottom - yy:.1f}" fill="{color}" opacity="0.85"><title>'
                        f'{_e(x.match.ref_node)} ({_e(x.match.op)}): adds {_g(x.added_rel_l2)}, total {_g(x.rel_l2)}'
                        f'</title></rect>')
    pts = " ".join(f"{left + (i + 0.5) * step:.1f},{y(x.rel_l2):.1f}" for i, x in enumerate(layers))
    body.append(f'<polyline points="{pts}" fill="none" stroke="{INK}" stroke-width="1.6"/>')
    for i, x in enumerate(layers):
        cx = left + (i + 0.5) * step
        body.append(f'<circle cx="{cx:.1f}" cy="{y(x.rel_l2):.1f}" r="2.4" fill="{INK}"/>')
        if id(x) in hot:
            row = hot_list.index(x)
            ly = 12 + 15 * row
            label = f"#{x.rank} {x.match.op} {x.match.ref_node or x.match.ref} (+{_g(x.added_rel_l2)})"
            label = label if len(label) <= 60 else label[:59] + "…"
            anchor = "start" if cx < w / 3 else ("end" if cx > 2 * w / 3 else "middle")
            body.append(f'<line x1="{cx:.1f}" y1="{ly + 3}" x2="{cx:.1f}" y2="{y(x.added_rel_l2):.1f}" stroke="{BAD}" '
                        f'stroke-dasharray="2 2" stroke-width="1"/>')
            body.append(_text(cx + (4 if anchor == "start" else -4 if anchor == "end" else 0), ly, label,
                              anchor=anchor, size=10.5, color=BAD, weight="600"))
    every = max(1, n // 24)
    for i, x in enumerate(layers):
        if i % every == 0:
            cx = left + (i + 0.5) * step
            body.append(_text(cx, h - bottom + 12, f"{i} {x.match.op}", anchor="end", size=9, rotate=-45))
    body.append(_text(14, (h - bottom) / 2 + tp, "relative L2 (log)", anchor="middle", size=11, rotate=-90))
    return _svg(plot_id, w, h, title, "".join(body))


def latency_plot(plot_id: str, lat: dict[str, Any]) -> str:
    items = [("reference", lat["ref_ms"], BEFORE), ("candidate", lat["cand_ms"], AFTER)]
    w, row, left = 520, 36, 90
    top = max(v for _, v, _ in items) or 1
    body = []
    for i, (label, v, color) in enumerate(items):
        yy = 10 + i * row
        bw = (w - left - 90) * v / top
        body.append(_text(left - 8, yy + 16, label, anchor="end", size=12, color=INK))
        body.append(f'<rect x="{left}" y="{yy + 3}" width="{max(bw, 0.5):.1f}" height="18" rx="3" fill="{color}"/>')
        body.append(_text(left + bw + 6, yy + 16, f"{v:.3f} ms", size=11, color=INK))
    return _svg(plot_id, w, 20 + row * 2, "latency before/after", "".join(body))


# -- page parts -----------------------------------------------------------------------------------


def _card(k: str, v: str, s: str = "") -> str:
    return f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div></div>'


def _cards(diff: CompareResult | None, report: Report | None) -> str:
    out = []
    if report is not None:
        b, a = report.before, report.after
        if b.file_bytes and a.file_bytes:
            out.append(_card("file size", _human_bytes(a.file_bytes), f"from {_human_bytes(b.file_bytes)} "
                             f"({a.file_bytes / b.file_bytes:.2f}x)"))
        out.append(_card("nodes", f"{a.nodes:,}", f"from {b.nodes:,}"))
    elif diff is not None and diff.size:
        b, a = diff.size["before"], diff.size["after"]
        if b.get("file_bytes") and a.get("file_bytes"):
            out.append(_card("file size", _human_bytes(a["file_bytes"]), f"from {_human_bytes(b['file_bytes'])} "
                             f"({a['file_bytes'] / b['file_bytes']:.2f}x)"))
        out.append(_card("nodes", f"{a['nodes']:,}", f"from {b['nodes']:,}"))
    if diff is not None:
        if diff.latency:
            lat = diff.latency
            sp = lat["speedup"] or 1.0
            rel = f"{sp:.2f}x faster" if sp >= 1 else f"{1 / sp:.2f}x slower"
            out.append(_card("latency (batch 1)", f"{lat['cand_ms']:.3f} ms", f"from {lat['ref_ms']:.3f} ms ({rel})"))
        for o in diff.outputs:
            if o.task:
                out.append(_card(f"{o.task['metric']} accuracy · {o.metrics.name}", _pct(o.task["cand"]),
                                 f"reference {_pct(o.task['ref'])} ({100 * o.task['delta']:+.2f} pp)"))
                break
        worst = max(diff.outputs, key=lambda o: o.metrics.rel_l2 if o.metrics.kind == "float" else o.metrics.mismatch,
                    default=None)
        if worst is not None:
            m = worst.metrics
            out.append(_card(f"worst output · {m.name}", _g(m.rel_l2 if m.kind == "float" else m.mismatch),
                             ("rel L2" if m.kind == "float" else "mismatch") + f", tolerance {_g(m.tolerance)}"))
    return f'<div class="cards">{"".join(out)}</div>'


def _outputs_section(diff: CompareResult) -> str:
    rows, plots = [], []
    for o in diff.outputs:
        m, ps = o.metrics, o.per_sample
        ok = '<span class="ok">yes</span>' if m.passed else '<span class="no">NO</span>'
        rows.append([_e(m.name) + ("" if o.cand_name == m.name else f" ↔ {_e(o.cand_name)}"), m.kind,
                     _g(m.rel_l2) if m.kind == "float" else f"mismatch {_g(m.mismatch)}",
                     _g(ps.get("p50")), _g(ps.get("p90")), _g(ps.get("p99")), _g(ps.get("max")), _g(m.max_abs),
                     "–" if m.snr_db is None else f"{m.snr_db:.1f}", _g(m.cosine, 6), _pct(m.top1), _pct(o.top5),
                     _g(m.tolerance), ok])
        if o.histogram:
            plots.append(f'<div><h3 style="font-size:13px;margin:6px 0">{_e(m.name)}: per-sample error</h3>'
                         + histogram(f"plot-hist-{m.name}", f"per-sample error of {m.name}", o.histogram, HIST_EDGES)
                         + "</div>")
    cols = ["output", "kind", "rel L2", "p50", "p90", "p99", "max", "max abs", "SNR dB", "cosine", "top-1 agree",
            "top-5 agree", "tol", "ok"]
    html_ = ('<section><h2>Outputs</h2><p class="lead">Over all samples; p50…max are the distribution of the '
             'per-sample relative L2 error. The gated metric is rel L2 (mismatch for integer outputs).</p>'
             + _table(cols, rows, table_id="outputs", raw=True))
    task = []
    for o in diff.outputs:
        t = o.task
        if t:
            task.append([o.metrics.name, t["metric"], _pct(t["ref"]), _pct(t["cand"]), f"{100 * t['delta']:+.2f} pp"])
            if t.get("ref_top5") is not None:
                task.append([o.metrics.name, "top-5", _pct(t["ref_top5"]), _pct(t["cand_top5"]),
                             f"{100 * t['delta_top5']:+.2f} pp"])
    if task:
        html_ += ('<h2 style="margin-top:18px">Task metrics (labels)</h2>'
                  + _table(["output", "metric", "reference", "candidate", "delta"], task, table_id="task"))
    if plots:
        html_ += f'<div class="grid2" style="margin-top:14px">{"".join(plots)}</div>'
    return html_ + "</section>"


def _layers_section(diff: CompareResult) -> str:
    pl = diff.per_layer
    if pl is None:
        return ""
    ranked = pl.ranked()
    rows = []
    for x in ranked[:25]:
        m = x.match
        rows.append([str(x.rank), m.ref_node or m.ref, m.op, m.how, m.cand, "×".join(map(str, m.shape or [])) or "?",
                     _g(x.rel_l2), _g(x.added_rel_l2), "–" if x.snr_db is None else f"{x.snr_db:.1f}",
                     "–" if x.snr_drop_db is None else f"{x.snr_drop_db:.1f}", _g(x.cosine, 6)])
    culprits = {id(x) for x in hot_layers(pl.layers)}
    hot = {i for i, x in enumerate(ranked[:25]) if id(x) in culprits}
    lead = (f"{len(pl.layers)} tensors matched between the two graphs (by producer op, position and shape; through "
            f"QDQ pairs, fused BatchNorm and low-rank splits), captured in {pl.groups} group(s) within "
            f"{_human_bytes(pl.budget_bytes)} on {pl.samples} sample(s); peak {_human_bytes(pl.peak_batch_bytes)} "
            f"of tensors per batch. Ranked by the error each layer adds over the error of its inputs; an added error "
            f"below {NOISE:g} is float rounding and is not highlighted.")
    legend = (f'<div class="legend"><i style="background:{INK}"></i>relative L2 at the layer'
              f'<i style="background:{BEFORE}"></i>error added by the layer<i style="background:{BAD}"></i>'
              f'top layers by added error</div>')
    extra = ""
    if pl.unmatched_ref:
        extra = (f'<p class="lead" style="margin-top:10px">Not matched ({len(pl.unmatched_ref)}): '
                 + ", ".join(f"<code>{_e(u)}</code>" for u in pl.unmatched_ref[:20])
                 + ("…" if len(pl.unmatched_ref) > 20 else "") + "</p>")
    return ('<section><h2>Per-layer error</h2>' f'<p class="lead">{_e(lead)}</p>'
            + layer_plot("plot-layers", "per-layer relative L2 error", pl.layers) + legend
            + '<div style="margin-top:14px"></div>'
            + _table(["#", "layer (reference node)", "op", "matched by", "candidate tensor", "shape", "rel L2",
                      "added", "SNR dB", "SNR drop", "cosine"], rows, table_id="layers", hot=hot, left={1, 4})
            + extra + "</section>")


def _size_section(diff: CompareResult) -> str:
    if not diff.size:
        return ""
    wb = diff.size["weight_bytes_by_op"]
    nb = diff.size["nodes_by_op"]
    items = [(k, float(v[0]), float(v[1])) for k, v in wb.items()]
    rows = [[k, _human_bytes(v[0]), _human_bytes(v[1]), f"{v[1] / v[0]:.3f}x" if v[0] else "–"] for k, v in wb.items()]
    node_rows = [[k, str(v[0]), str(v[1])] for k, v in sorted(nb.items(), key=lambda kv: -max(kv[1]))]
    legend = (f'<div class="legend"><i style="background:{BEFORE}"></i>before<i style="background:{AFTER}"></i>'
              f'after</div>')
    return ('<section><h2>Size by op type</h2><div class="grid2"><div>'
            + bars_before_after("plot-size", "weight bytes by op type, before and after", items) + legend
            + '</div><div>' + _table(["op type (weights)", "before", "after", "ratio"], rows, table_id="size")
            + '<div style="margin-top:12px"></div>'
            + _table(["op type (nodes)", "before", "after"], node_rows, table_id="nodes") + "</div></div></section>")


def _latency_section(diff: CompareResult) -> str:
    lat = diff.latency
    if not lat:
        return ""
    return ('<section><h2>Latency</h2><p class="lead">'
            + _e(f"onnxruntime CPU, batch 1, median of {lat['runs']} runs after warm-up: "
                 f"{lat['ref_ms']:.3f} ms → {lat['cand_ms']:.3f} ms ({lat['speedup']:.2f}x)")
            + "</p>" + latency_plot("plot-latency", lat) + "</section>")


def _passes_section(report: Report) -> str:
    from onnxshrink.report import Report as _R

    rows = []
    for p in report.passes:
        rows.append([p.spec, f"{p.before.nodes} → {p.after.nodes}", f"{p.before.params:,} → {p.after.params:,}",
                     f"{_human_bytes(p.before.weight_bytes)} → {_human_bytes(p.after.weight_bytes)}",
                     f"{p.seconds:.3f} s", _R._pass_detail(p)])
    summary = [[r[0], r[1], r[2], r[3]] for r in report._summary_rows()]
    return ('<section><h2>Pipeline</h2><pre>' + _e(report.pipeline) + "</pre>"
            '<div style="margin-top:14px"></div>'
            + _table(["pass", "nodes", "params", "weight bytes", "time", "detail"], rows, table_id="passes",
                     left={0, 5})
            + '<div style="margin-top:14px"></div>'
            + _table(["", "before", "after", "ratio"], summary, table_id="summary") + "</section>")


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    return '<section><h2>Notes</h2><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></section>"


def _page(title: str, verdict: str, paths: str, body: str, version: str) -> str:
    cls = verdict.replace(" ", "-")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<header><h1>{_e(title)}<span class="badge {_e(cls)}" id="verdict">{_e(verdict)}</span></h1>'
        f'<div class="paths">{paths}</div></header>{body}'
        f'<footer>onnxshrink {_e(version)} · self-contained report, no network</footer></main></body></html>\n'
    )


def compare_page(diff: CompareResult) -> str:
    """The HTML page of ``onnxshrink compare``."""
    paths = (f"reference {_e(diff.ref)}<br>candidate {_e(diff.cand)}<br>{diff.samples} sample(s) from "
             f"{_e(diff.source)} · {diff.seconds:.2f} s" + (f"<br>{_e(diff.reason)}" if diff.reason else ""))
    body = (_cards(diff, None) + _outputs_section(diff) + _layers_section(diff) + _size_section(diff)
            + _latency_section(diff) + _notes(diff.notes))
    return _page("onnxshrink compare", diff.verdict, paths, body, diff.version)


def optimize_page(report: Report, diff: CompareResult) -> str:
    """The HTML page of ``onnxshrink optimize --report x.html``: the run, and the comparison of its input
    and its result (``diff``)."""
    v = report.validation
    paths = (f"{_e(report.input)} → {_e(report.output or '(not saved)')}<br>"
             f"{report.seconds:.2f} s" + (f" · validation on {v.samples} sample(s) from {_e(v.source)}"
                                         if v is not None and v.samples else "")
             + (f"<br>{_e(v.reason)}" if v is not None and v.reason else ""))
    body = (_cards(diff, report) + _passes_section(report) + _outputs_section(diff) + _layers_section(diff)
            + _size_section(diff) + _latency_section(diff) + _notes(report.notes + diff.notes))
    return _page("onnxshrink optimize", report.verdict, paths, body, report.version)

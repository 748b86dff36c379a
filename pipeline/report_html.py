"""The HTML report's page: :func:`render` turns pipeline.report's data into one self-contained file.

Everything is inline (CSS, a small script, charts as SVG data URIs, thumbnails
as JPEG data URIs): the file opens offline, from anywhere. Text from the
store (shard URLs, ids, error messages) is escaped; the per-segment table is
built by the script from JSON embedded in the page (sortable, filterable,
paged), every other table is plain HTML (its columns sort on click).
"""

from __future__ import annotations

import html
import json

from edje_indexer.pipeline import charts

CSS = """
:root { --fg: #1d2330; --muted: #5b6577; --line: #d8dde6; --bad: #b42318; --warn: #b54708; --ok: #067647;
        --bg2: #f5f7fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0; }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid
var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
.muted { color: var(--muted); } code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
nav a { margin-right: 14px; } .banner { padding: 8px 12px; border-radius: 6px; margin: 8px 0; font-weight: 600; }
.banner.bad { background: #fef3f2; color: var(--bad); } .banner.warn { background: #fffaeb; color: var(--warn); }
.banner.ok { background: #ecfdf3; color: var(--ok); }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg2); position: sticky; top: 0; } td.num, th.num { text-align: right; }
table.sortable th, #segment-table th { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
table.kv th { position: static; width: 190px; } .wide { width: 100%; }
td.msg { max-width: 420px; overflow-wrap: anywhere; } td.shard { overflow-wrap: anywhere; max-width: 360px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } img.chart { max-width: 100%; height: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; width: 150px; font-size: 11px; }
figure img, .ph { width: 112px; height: 112px; object-fit: contain; background: var(--bg2); border: 1px solid
var(--line); display: flex; align-items: center; justify-content: center; text-align: center; padding: 4px;
color: var(--muted); overflow: hidden; font-size: 10px; } figcaption { overflow-wrap: anywhere; }
.pager { margin: 4px 0; } .pager button { margin-right: 6px; } input[type=search] { padding: 3px 6px; width: 280px; }
.bad { color: var(--bad); } .warn { color: var(--warn); } ul { margin: 4px 0 10px; padding-left: 20px; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  function cmp(a, b) {
    if (a === null || a === undefined) return b === null || b === undefined ? 0 : -1;
    if (b === null || b === undefined) return 1;
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a).localeCompare(String(b));
  }
  function cellValue(td, numeric) {
    var v = td.getAttribute("data-v");
    if (v === null) v = td.textContent.trim();
    if (!numeric) return v;
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  function markSorted(ths, th, desc) {
    ths.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var ths = Array.prototype.slice.call(table.tHead.rows[0].cells);
    ths.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var desc = th.getAttribute("aria-sort") === "ascending";
        var numeric = th.classList.contains("num");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var r = cmp(cellValue(a.cells[col], numeric), cellValue(b.cells[col], numeric));
          return desc ? -r : r;
        });
        rows.forEach(function (r) { body.appendChild(r); });
        markSorted(ths, th, desc);
      });
    });
  });
  var source = document.getElementById("segment-data");
  var table = document.getElementById("segment-table");
  if (!source || !table) return;
  var data = JSON.parse(source.textContent);
  var cols = data.columns, rows = data.rows, PAGE = 100;
  var state = { key: cols.indexOf("committed_at"), desc: false, page: 0, filter: "" };
  var head = table.tHead.rows[0], body = table.tBodies[0];
  var ths = Array.prototype.slice.call(head.cells);
  function fmt(name, v) {
    if (v === null || v === undefined) return "";
    if (name === "complete") return v ? "yes" : "NO";
    if (name === "rejected_by_reason") {
      return Object.keys(v).map(function (k) { return k + "=" + v[k]; }).join(", ");
    }
    if (typeof v === "number") return v.toLocaleString("en-US");
    return String(v);
  }
  function render() {
    var f = state.filter.toLowerCase();
    var shown = rows.filter(function (r) {
      return !f || (r[0] + " " + r[1]).toLowerCase().indexOf(f) >= 0;
    });
    var k = state.key;
    shown.sort(function (a, b) { var r = cmp(a[k], b[k]); return state.desc ? -r : r; });
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * PAGE, part = shown.slice(start, start + PAGE);
    var frag = document.createDocumentFragment();
    part.forEach(function (r) {
      var tr = document.createElement("tr");
      if (!r[cols.indexOf("complete")]) tr.className = "warn";
      r.forEach(function (v, i) {
        var td = document.createElement("td");
        td.textContent = fmt(cols[i], v);
        if (typeof v === "number") td.className = "num";
        if (cols[i] === "shard") td.className = "shard";
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    document.getElementById("segments-pos").textContent = shown.length
      ? "rows " + (start + 1) + "\u2013" + (start + part.length) + " of " + shown.length : "no rows";
    markSorted(ths, ths[k], state.desc);
  }
  ths.forEach(function (th, i) {
    th.addEventListener("click", function () {
      state.desc = state.key === i ? !state.desc : false;
      state.key = i; state.page = 0; render();
    });
  });
  document.getElementById("segments-prev").addEventListener("click", function () {
    state.page = Math.max(0, state.page - 1); render();
  });
  document.getElementById("segments-next").addEventListener("click", function () { state.page += 1; render(); });
  document.getElementById("segments-filter").addEventListener("input", function (e) {
    state.filter = e.target.value; state.page = 0; render();
  });
  render();
})();
"""

SEGMENT_COLUMNS = [
    ("segment", "segment"),
    ("shard", "shard"),
    ("indexed", "indexed"),
    ("rejected", "rejected"),
    ("rejected_by_reason", "rejected by reason"),
    ("complete", "complete"),
    ("images_per_s", "images/s"),
    ("seconds", "seconds"),
    ("committed_at", "committed (UTC)"),
    ("source_bytes", "source bytes"),
]


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x, digits: int = 0) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits or (1 if abs(x) >= 100 else 3)}f}"


def _json_script(element_id: str, obj) -> str:
    text = json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")  # no "</script>" inside
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _kv(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    return (
        f'<table class="{cls}"><tbody>'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )


def _table(headers: list[tuple[str, bool]], rows: list[list[str]], table_id: str, cls: str = "sortable") -> str:
    """``headers``: (label, numeric); cells are already escaped HTML."""
    head = "".join(f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, (_, num) in zip(r, headers))
        + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}" class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _chart(src: str, alt: str, name: str) -> str:
    return f'<img class="chart" data-chart="{esc(name)}" alt="{esc(alt)}" src="{src}">'


def _list(items: list[str], empty: str = "none") -> str:
    if not items:
        return f'<p class="muted">{esc(empty)}</p>'
    return "<ul>" + "".join(f"<li><code>{esc(i)}</code></li>" for i in items) + "</ul>"


def _summary(r: dict) -> str:
    s, m = r["summary"], r["summary"]["model"]
    adapter = m["adapter"]
    return _kv(
        [
            ("images", f"{_num(s['images'])} in {_num(s['segments'])} segment(s), {_num(s['rows'])} rows stored"),
            ("tokens per image", f"{s['tokens_per_image']} x {s['token_dim']}"),
            ("quantization", f"{esc(s['quantization'])} (stored as {esc(s['stored_dtype'])})"),
            ("bytes per image", f"{_num(s['bytes_per_image'])} (token data + ids + index)"),
            ("bytes", ", ".join(f"{esc(k)} {_num(v)}" for k, v in s["bytes"].items())),
            (
                "backbone",
                f"<code>{esc(m['backbone'])}</code> sha256 <code>{esc(m['backbone_sha256'][:16])}</code>"
                + (' <span class="bad">RANDOM WEIGHTS</span>' if m["random_weights"] else ""),
            ),
            (
                "adapter",
                f"m={esc(adapter.get('num_queries'))} d={esc(adapter.get('out_dim'))} sha256 "
                f"<code>{esc(m['adapter_sha256'][:16])}</code>"
                + (' <span class="bad">RANDOM ADAPTER</span>' if m["random_adapter"] else ""),
            ),
            ("tokens from", esc(m["tokens"])),
            ("preprocessing", f"<code>{esc(json.dumps(s['preprocessing'], sort_keys=True))}</code>"),
            ("id policy", f"<code>{esc(s['id_policy'])}</code>"),
            ("samples read", f"{_num(s['samples_read'])}, rejected {_num(s['rejected_total'])}"),
            ("duplicate ids", _num(s["duplicate_ids"])),
            ("index generation", esc(s.get("index_generation"))),
            ("schema version", esc(s["schema_version"])),
            ("written by", f"edje-indexer {esc(s['software_version'])}"),
        ]
    )


def _segments(r: dict) -> str:
    segs, table = r["segments"], r["segment_table"]
    colors = charts.reason_colors(list(r["rejected_by_reason"]))
    data = {"columns": [k for k, _ in SEGMENT_COLUMNS], "rows": [[s[k] for k, _ in SEGMENT_COLUMNS] for s in table]}
    note = (
        f'<p class="muted">The table holds {len(table):,} of {len(segs):,} segments (every segment with rejects or '
        f"an incomplete shard, then an even spread); the charts show all of them.</p>"
        if len(table) < len(segs)
        else ""
    )
    heads = "".join(f"<th>{esc(label)}</th>" for _, label in SEGMENT_COLUMNS)
    return (
        '<div class="charts">'
        + _chart(charts.throughput_chart(segs), "images stored and images/s over commit time", "throughput")
        + (
            _chart(
                charts.rejects_per_segment_chart(segs, colors), "rejected samples per segment", "rejects-per-segment"
            )
            if colors
            else '<p class="muted">No segment has rejected samples.</p>'
        )
        + "</div>"
        + note
        + '<div class="pager"><input type="search" id="segments-filter" placeholder="filter by shard or segment"> '
        '<button id="segments-prev" type="button">previous</button><button id="segments-next" type="button">next'
        '</button><span id="segments-pos" class="muted"></span></div>'
        + f'<table id="segment-table" class="wide"><thead><tr>{heads}</tr></thead><tbody></tbody></table>'
        + "<noscript>The segment table needs JavaScript.</noscript>"
        + _json_script("segment-data", data)
    )


def _rejects(r: dict) -> str:
    counts = r["rejected_by_reason"]
    if not counts:
        return '<p class="muted">No sample was rejected.</p>'
    colors = charts.reason_colors(list(counts))
    segs_with = {k: sum(1 for s in r["segments"] if s["rejected_by_reason"].get(k)) for k in counts}
    total = sum(counts.values())
    by_reason = _table(
        [("reason", False), ("rejected", True), ("share", True), ("segments", True)],
        [
            [f"<code>{esc(k)}</code>", _num(v), f"{v / total:.1%}", _num(segs_with[k])]
            for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
        ],
        "rejects-by-reason",
    )
    dead = r["dead_letters"]
    rows = dead["rows"]
    table = _table(
        [(h, False) for h in ("id", "shard", "member", "stage", "reason", "error", "message")],
        [
            [
                f"<code>{esc(x['id'])}</code>",
                f"<code>{esc(x['shard'])}</code>",
                f"<code>{esc(x['member'])}</code>",
                esc(x["stage"]),
                f"<code>{esc(x['reason'])}</code>",
                esc(x["error_type"]),
                esc(x["message"]),
            ]
            for x in rows
        ],
        "dead-letters",
    )
    figures = []
    for x in rows:
        t = x.get("thumbnail")
        if t is None:
            continue
        pic = (
            f'<img class="thumb" src="{t["src"]}" alt="{esc(x["id"])}">'
            if t["src"]
            else f'<div class="ph thumb-placeholder">{esc(t["note"])}</div>'
        )
        figures.append(
            f"<figure>{pic}<figcaption><code>{esc(x['id'] or x['member'])}</code><br>{esc(x['reason'])}"
            + (f"<br><span class='muted'>{esc(t['note'])}</span>" if t["src"] else "")
            + "</figcaption></figure>"
        )
    shown = f"{len(rows):,} of {total:,} rejected samples (up to {dead['per_reason']} per reason)"
    return (
        _chart(charts.rejects_by_reason_chart(counts, colors), "rejected samples by reason", "rejects-by-reason")
        + by_reason
        + "<h3>Rejected images</h3><p class='muted'>A sample, read back from the source shards where they can be "
        "read; an image that cannot be shown has a note instead.</p>"
        + f'<div class="gallery">{"".join(figures)}</div>'
        + f"<h3>Dead-letter rows</h3><p class='muted'>{shown}; all of them: <code>edje-index rejected STORE</code>"
        "</p>" + table
    )


def _tokens(r: dict) -> str:
    t = r["tokens"]
    if not t.get("rows_sampled"):
        return '<p class="muted">The store holds no tokens yet.</p>'
    a = t["arrays"]
    norm = t["norm"]
    rows = [
        ("sample", f"{t['rows_sampled']:,} images ({t['tokens_sampled']:,} tokens) from {t['segments_sampled']} "
         f"segment(s), of {t['rows_in_store']:,} rows stored (seed {t['seed']})"),
        ("token norm", f"mean {norm['mean']:.4g}, median {norm['median']:.4g}, p1 {norm['p1']:.4g}, "
         f"p99 {norm['p99']:.4g}, max {norm['max']:.4g}"),
        ("zero values", f"{t['zero_values_share']:.3%} (all-zero tokens {t['zero_tokens_share']:.3%})"),
        ("non-finite values", f"{t['nonfinite_values_share']:.3%} ({t['rows_with_nonfinite']} image(s) with any)"),
        ("per-dimension mean", f"mean |mean| {t['dim_mean_abs_mean']:.4g}"),
        ("per-dimension std", f"mean {t['dim_std_mean']:.4g}, min {t['dim_std_min']:.4g}, max {t['dim_std_max']:.4g}"),
        ("image similarity", "mean cosine of mean-pooled tokens between sampled images "
         + (f"{t['image_cosine_mean']:.4f}" if t["image_cosine_mean"] is not None else "n/a")),
    ]  # fmt: skip
    out = [
        _histogram(a["norms"], "per-token L2 norm", "norms"),
        _chart(charts.per_dimension_chart(a["dim_mean"], a["dim_std"]), "mean and spread per dimension", "dims"),
    ]
    if "int8_relative_error" in t:
        e = t["int8_relative_error"]
        rows.append(
            (
                "quantization relative error",  # int8 and int4 alike (the key predates int4)
                f"expected (rounding uniform in ±scale/2) median {e['expected_rms']['median']:.3%}, p99 "
                f"{e['expected_rms']['p99']:.3%}; bound median {e['bound']['median']:.3%}, max {e['bound']['max']:.3%}",
            )
        )
        out.append(_histogram(a["int8_relative_error"], "expected relative dequantization error", "int8-error"))
    return _kv([(k, esc(v)) for k, v in rows]) + '<div class="charts">' + "".join(out) + "</div>"


def _histogram(values, xlabel: str, name: str) -> str:
    return _chart(charts.histogram_chart(values, xlabel), xlabel, name)


def _integrity(r: dict) -> str:
    v, sh, s = r["verify"], r["shards"], r["summary"]
    status = (
        f'<div class="banner ok">verify: ok, {v["segments"]:,} segment(s) checked{" (deep)" if v["deep"] else ""}</div>'
        if v["ok"]
        else f'<div class="banner bad">verify: DAMAGED, {len(v["problems"])} problem(s)</div>'
    )
    failed = _table(
        [("shard", False), ("error", False), ("failed at", False)],
        [[f"<code>{esc(f['shard'])}</code>", esc(f["error"]), esc(f["failed_at"])] for f in sh["failed"]],
        "failed-shards",
    )
    incomplete = _table(
        [("shard", False), ("why", False)],
        [[f"<code>{esc(x['shard'])}</code>", esc(x["reason"])] for x in sh["incomplete"]],
        "incomplete-shards",
    )
    return (
        status
        + f"<h3>Problems ({len(v['problems'])})</h3>"
        + _list(v["problems"])
        + f"<h3>Warnings ({len(v['warnings'])})</h3>"
        + _list(v["warnings"])
        + f"<h3>Failed shards ({len(sh['failed'])})</h3><p class='muted'>Could not be read at all; the next run "
        "retries them.</p>"
        + (failed if sh["failed"] else '<p class="muted">none</p>')
        + f"<h3>Incomplete shards ({len(sh['incomplete'])})</h3><p class='muted'>Damaged tar or compression: "
        "the samples before the damage are stored.</p>"
        + (incomplete if sh["incomplete"] else '<p class="muted">none</p>')
        + f"<h3>Missing from the corpus ({len(sh['missing'])})</h3>"
        + _list(sh["missing"])
        + f"<h3>Changed since their commit ({len(sh['changed'])})</h3><p class='muted'>The next run re-indexes "
        "them.</p>"
        + _list(sh["changed"])
        + (f"<h3>Sources not checked ({len(sh['unknown_sources'])})</h3>" + _list(sh["unknown_sources"]))
        + f"<h3>Uncommitted data ({len(s['uncommitted_data'])})</h3>"
        + _list(s["uncommitted_data"])
    )


def render(r: dict) -> str:
    s, m = r["summary"], r["summary"]["model"]
    banners = []
    if m["random_weights"] or m["random_adapter"]:
        which = " and ".join(w for w, on in (("backbone", m["random_weights"]), ("adapter", m["random_adapter"])) if on)
        banners.append(f'<div class="banner warn">Random weights ({which}): these tokens mean nothing.</div>')
    if not r["verify"]["ok"]:
        banners.append(f'<div class="banner bad">verify found {len(r["verify"]["problems"])} problem(s).</div>')
    sections = [
        ("summary", "Summary", _summary(r)),
        ("segments", "Segments", _segments(r)),
        ("rejects", "Rejects", _rejects(r)),
        ("tokens", "Tokens", _tokens(r)),
        ("integrity", "Shards and integrity", _integrity(r)),
    ]
    nav = "".join(f'<a href="#{k}">{esc(title)}</a>' for k, title, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{esc(title)}</h2>{content}</section>' for k, title, content in sections)
    built = ", ".join(f"{k} {v:.2f} s" for k, v in r["timings_s"].items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Token store {esc(s['store'])}</title><style>{CSS}</style></head><body>"
        f"<header><h1>Token store report</h1><div class='mono'>{esc(s['store'])}</div>"
        f"<div class='muted'>{_num(s['images'])} images in {_num(s['segments'])} segments; generated "
        f"{esc(r['generated_at'])} by edje-indexer {esc(_version())}</div>{''.join(banners)}<nav>{nav}</nav></header>"
        f"<main>{body}<p class='muted'>Data gathered in: {esc(built)}.</p></main>"
        f"<script>{SCRIPT}</script></body></html>"
    )


def _version() -> str:
    from edje_indexer import __version__

    return __version__

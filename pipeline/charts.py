"""The HTML report's charts: matplotlib figures as self-contained SVG data URIs.

matplotlib (the ``[report]`` extra) is imported only here, and only its
object-oriented API is used (no pyplot, no global backend state). Text stays
text in the SVG (``svg.fonttype: none``); point clouds larger than
``RASTERIZE_FROM`` are embedded as a bitmap inside the SVG, so a chart's size
does not grow with the store.
"""

from __future__ import annotations

import base64
import datetime as dt
import io

import numpy as np

RASTERIZE_FROM = 2000
MAX_BARS = 120
_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "edje-report",  # the same store gives the same file
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(
            "the HTML report needs matplotlib: pip install 'edje-indexer[report]' (or pip install matplotlib)"
        ) from e
    return matplotlib, Figure


def _chart(draw, w: float = 7.0, h: float = 2.8) -> str:
    """``draw(fig)`` on a new figure, in the report's style; the figure as an SVG data URI."""
    matplotlib, Figure = _matplotlib()
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(w, h), layout="constrained")
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def reason_colors(reasons: list[str]) -> dict[str, str]:
    palette = [
        "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
        "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
    ]  # fmt: skip
    return {r: palette[i % len(palette)] for i, r in enumerate(sorted(reasons))}


def _times(segments: list[dict]) -> list[dt.datetime]:
    return [dt.datetime.fromisoformat(s["committed_at"]) for s in segments]


def throughput_chart(segments: list[dict]) -> str:
    """Top: images in the store over commit time (cumulative). Bottom: each segment's images/s at its commit."""
    import matplotlib.dates as mdates

    segs = sorted(segments, key=lambda s: s["committed_at"])
    many = len(segs) >= RASTERIZE_FROM

    def draw(fig):
        top, bottom = fig.subplots(2, 1, sharex=True)
        if segs:
            when = _times(segs)
            cumulative = np.cumsum([s["indexed"] for s in segs])
            top.step([when[0], *when], [0, *cumulative], where="post", color="#4e79a7", rasterized=many)
            span = (when[-1] - when[0]).total_seconds()
            pad = dt.timedelta(seconds=max(5.0, 0.04 * span))
            bottom.set_xlim(when[0] - pad, when[-1] + pad)
            locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
            bottom.xaxis.set_major_locator(locator)
            bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=dt.timezone.utc))
            rate = [s["images_per_s"] if s["images_per_s"] is not None else np.nan for s in segs]
            colors = ["#4e79a7" if s["complete"] else "#e15759" for s in segs]
            bottom.scatter(when, rate, s=6 if many else 14, c=colors, alpha=0.7, linewidths=0, rasterized=many)
        top.set_ylabel("images stored")
        bottom.set_ylabel("images/s per segment")
        bottom.set_xlabel("commit time (UTC); red: incomplete shard")

    return _chart(draw, 7.0, 4.2)


def rejects_per_segment_chart(segments: list[dict], colors: dict[str, str]) -> str:
    """Rejected samples per segment (commit order), stacked by reason; many segments are summed in bins."""
    segs = sorted(segments, key=lambda s: s["committed_at"])
    n = len(segs)
    per_bin = max(1, -(-n // MAX_BARS))
    bins = -(-n // per_bin) if n else 0

    def draw(fig):
        ax = fig.subplots()
        bottom = np.zeros(bins)
        for reason, color in colors.items():
            padded = np.zeros(bins * per_bin)
            padded[:n] = [s["rejected_by_reason"].get(reason, 0) for s in segs]
            summed = padded.reshape(bins, per_bin).sum(1)
            ax.bar(np.arange(bins), summed, bottom=bottom, color=color, label=reason, width=0.85)
            bottom += summed
        if colors:
            ax.legend(fontsize=7, ncols=min(4, len(colors)), loc="upper right", frameon=False)
        ax.set_xlabel("segment, in commit order" + (f" (bins of {per_bin} segments)" if per_bin > 1 else ""))
        ax.set_ylabel("rejected samples")

    return _chart(draw, 7.0, 2.8)


def rejects_by_reason_chart(counts: dict[str, int], colors: dict[str, str]) -> str:
    items = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))

    def draw(fig):
        ax = fig.subplots()
        ax.barh([k for k, _ in items], [v for _, v in items], color=[colors[k] for k, _ in items])
        for y, (_, v) in enumerate(items):
            ax.annotate(str(v), (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel("rejected samples")
        ax.grid(axis="y", visible=False)

    return _chart(draw, 7.0, max(1.4, 0.32 * len(items) + 0.8))


def histogram_chart(values: np.ndarray, xlabel: str, ylabel: str = "tokens") -> str:
    v = values[np.isfinite(values)]

    def draw(fig):
        ax = fig.subplots()
        if len(v):
            ax.hist(v, bins=50, color="#4e79a7")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)

    return _chart(draw, 4.6, 2.6)


def per_dimension_chart(mean: np.ndarray, std: np.ndarray) -> str:
    def draw(fig):
        ax = fig.subplots()
        x = np.arange(len(mean))
        ax.fill_between(x, mean - std, mean + std, color="#4e79a7", alpha=0.25, linewidth=0, label="mean ± std")
        ax.plot(x, mean, color="#4e79a7", linewidth=0.8, label="mean")
        ax.set_xlabel("token dimension")
        ax.set_ylabel("value")
        ax.legend(fontsize=7, frameon=False, loc="upper right")

    return _chart(draw, 7.0, 2.6)

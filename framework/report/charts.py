"""The report's charts: matplotlib figures written as SVG (text kept as text).

matplotlib is imported inside each function (it comes with ``charfw[train]``, like the
TensorBoard reader the training chart feeds on), so a report of a build that never
trained, or a rebuild whose charts are all reused, does not load it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: the page's palette (templates/report/style.css.j2 uses the same colours)
INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
BLUE = "#2563eb"
LIGHT_BLUE = "#93c5fd"
ORANGE = "#ea580c"
GREEN = "#059669"
VIOLET = "#7c3aed"
GREY = "#9ca3af"

Points = Sequence[tuple[float, float]]


@contextlib.contextmanager
def _figure(width: float, height: float, rows: int = 1, ratios: Sequence[float] | None = None, *,
            margins: tuple[float, float, float, float] = (0.75, 0.25, 0.45, 0.5)) -> Iterator[Any]:
    """A figure of ``rows`` axes sharing x; ``margins`` (left, right, top, bottom) in inches.
    Fixed margins instead of a layout engine: drawing twice to lay out would double the
    time a chart takes."""
    import matplotlib
    from matplotlib.figure import Figure

    style = {
        "svg.fonttype": "none",  # text stays text: smaller files, the page's font
        "svg.hashsalt": "charfw",  # the same data gives the same file
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
        "font.size": 9,
        "axes.edgecolor": GRID,
        "axes.labelcolor": MUTED,
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "axes.titlecolor": INK,
        "axes.titlelocation": "left",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": GRID,
        "grid.linewidth": 0.8,
        "xtick.color": MUTED,
        "ytick.color": MUTED,
        "legend.frameon": False,
        "legend.fontsize": 8,
    }
    left, right, top, bottom = margins
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(width, height))
        fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                            bottom=bottom / height, hspace=0.75 / (height / rows))
        axes = fig.subplots(rows, 1, sharex=True, gridspec_kw={"height_ratios": ratios} if ratios else None,
                            squeeze=False)[:, 0]
        yield fig, list(axes)


def _save(fig: Any, dest: Path) -> None:
    fig.savefig(dest, format="svg", metadata={"Date": None, "Creator": "charfw"}, transparent=True)


def _legend(ax: Any, handles: list[Any], labels: list[str]) -> None:
    """One row of legend entries above the axes, right-aligned (the title sits left)."""
    ax.legend(handles, labels, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(labels),
              borderaxespad=0.2, handlelength=1.6, columnspacing=1.2)


def _second_axis(ax: Any, points: Sequence[tuple[float, float]], style: str, color: str, label: str,
                 limits: tuple[float, float], **line: Any) -> Any:
    """``points`` on a y axis of their own on the right, in ``color``; returns the line."""
    twin = ax.twinx()
    twin.spines["right"].set_visible(True)
    (drawn,) = twin.plot([x for x, _ in points], [y for _, y in points], style, color=color, zorder=3, **line)
    twin.set_ylim(*limits)
    twin.set_ylabel(label, color=color)
    twin.tick_params(axis="y", colors=color)
    twin.grid(False)
    return drawn


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first
    values are not pulled towards 0. The default weight follows the run's length."""
    if weight is None:
        weight = min(0.98, max(0.6, 1 - 15 / max(len(values), 1)))
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def training_chart(dest: Path, loss: Points, lrs: dict[str, Points]) -> None:
    """Loss (raw and smoothed) over the steps, the learning rates under it."""
    rows = 2 if lrs else 1
    with _figure(7.6, 4.6 if lrs else 3.0, rows, [2.2, 1] if lrs else None) as (fig, axes):
        ax = axes[0]
        steps = [s for s, _ in loss]
        values = [v for _, v in loss]
        ax.plot(steps, values, color=LIGHT_BLUE, linewidth=1, label="loss")
        ax.plot(steps, smooth(values), color=BLUE, linewidth=2, label="smoothed")
        ax.set_title("Loss")
        _legend(ax, *ax.get_legend_handles_labels())
        if lrs:
            lax = axes[1]
            for (name, points), color in zip(lrs.items(), (ORANGE, VIOLET, GREEN, GREY), strict=False):
                lax.plot([s for s, _ in points], [v for _, v in points], color=color, linewidth=1.6, label=name)
            lax.set_title("Learning rate")
            lax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            _legend(lax, *lax.get_legend_handles_labels())
        axes[-1].set_xlabel("step")
        _save(fig, dest)


def lora_chart(dest: Path, blocks: Sequence[str], norms: dict[str, Sequence[float | None]],
               vector: Sequence[float | None] | None, ranks: Sequence[tuple[int, float, int] | None] | None,
               retained: Sequence[float | None] | None) -> None:
    """Over the LBW blocks: ‖ΔW‖ of each file (bars side by side) with the merge vector on a
    second axis (blocks the merge drops shaded); under it, when the file was compressed,
    the ranks per block (median bar, min–max whisker) and the share of each block's ‖ΔW‖
    the compression kept."""
    rows = 2 if ranks is not None else 1
    with _figure(7.6, 5.8 if rows == 2 else 3.3, rows, [1.25, 1] if rows == 2 else None,
                 margins=(0.75, 0.7, 0.45, 0.6)) as (fig, axes):
        ax = axes[0]
        xs = list(range(len(blocks)))
        width = 0.8 / max(len(norms), 1)
        for i, ((label, values), color) in enumerate(zip(norms.items(), (LIGHT_BLUE, BLUE, GREEN), strict=False)):
            ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], [v or 0 for v in values], width,
                   color=color, label=label, zorder=2)
        ax.set_xlim(-0.6, len(blocks) - 0.4)
        ax.set_ylabel("‖ΔW‖ (Frobenius)")
        ax.set_title("‖ΔW‖ per block")
        ax.grid(axis="x", visible=False)
        handles, labels = ax.get_legend_handles_labels()
        if vector is not None:
            for x, v in zip(xs, vector, strict=True):
                if v is not None and v == 0:
                    for a in axes:
                        a.axvspan(x - 0.5, x + 0.5, color="#f3f4f6", zorder=0, linewidth=0)
            points = [(x, v) for x, v in zip(xs, vector, strict=True) if v is not None]
            top = max([1.08, *(v * 1.08 for _, v in points)])
            handles.append(_second_axis(ax, points, "D", ORANGE, "merge weight", (-0.03, top), markersize=4.5))
            labels.append("merge vector")
        _legend(ax, handles, labels)
        if ranks is not None:
            rax = axes[1]
            present = [(x, r) for x, r in zip(xs, ranks, strict=True) if r is not None]
            rax.bar([x for x, _ in present], [r[1] for _, r in present], 0.6, color=LIGHT_BLUE, label="median rank",
                    zorder=2)
            rax.errorbar([x for x, _ in present], [r[1] for _, r in present],
                         yerr=[[r[1] - r[0] for _, r in present], [r[2] - r[1] for _, r in present]],
                         fmt="none", ecolor=BLUE, elinewidth=1, capsize=2, label="min–max", zorder=3)
            rax.set_ylim(0, max([1, *(r[2] for _, r in present)]) * 1.12)
            rax.set_ylabel("rank")
            rax.set_title("After compression")
            rax.grid(axis="x", visible=False)
            handles, labels = rax.get_legend_handles_labels()
            kept = [(x, v * 100) for x, v in zip(xs, retained or [], strict=False) if v is not None]
            if kept:
                low = min(min(v for _, v in kept) - 0.5, 99.0)
                handles.append(_second_axis(rax, kept, "o-", GREEN, "‖ΔW‖ kept %", (low, 100.3), markersize=3.5,
                                            linewidth=1.4))
                labels.append("‖ΔW‖ kept %")
            _legend(rax, handles, labels)
        axes[-1].set_xticks(xs, blocks, rotation=90, fontsize=7.5)
        _save(fig, dest)

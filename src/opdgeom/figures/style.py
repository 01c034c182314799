"""One style for every figure: a fixed colour per method (Okabe-Ito, colour-blind safe),
a fixed line style and marker per run within its method, paper-column sizes, and atomic
PNG+PDF output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opdgeom.io import atomic_path  # noqa: E402

METHOD_COLORS = {
    "sft": "#0072B2",
    "opd": "#D55E00",
    "rlvr": "#009E73",
    "mix": "#CC79A7",
    "base": "#7F7F7F",
    "teacher": "#000000",
}
METHOD_LABELS = {"sft": "SFT", "opd": "OPD", "rlvr": "RLVR", "mix": "OPD+RLVR mix"}
FALLBACK_COLORS = ["#E69F00", "#56B4E9", "#F0E442", "#999999"]
# The plain run of a method (its first in config order) is drawn solid with circles everywhere; the
# method's other runs drawn in one figure get LINE_STYLES[k % 8] and MARKERS[k % 7], k = 1, 2, ... in
# the figure's order: 56 distinct combinations, so every run of a method stays distinguishable.
LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 3))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
COLUMN_WIDTH_IN = 3.4
DOUBLE_WIDTH_IN = 7.0
DPI = 200
RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.facecolor": "white",
}


def color_for(method: str, index: int = 0) -> str:
    return METHOD_COLORS.get(method, FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


@dataclass(frozen=True)
class RunStyle:
    color: str
    linestyle: object  # a matplotlib line style: name or (offset, dash pattern)
    marker: str
    filled: bool = True  # the plain run and every other variant: filled markers; the rest hollow

    def marker_face(self) -> str:
        return self.color if self.filled else "white"

    def line(self) -> dict:
        """Keyword arguments for ``ax.plot``."""
        return {
            "color": self.color,
            "ls": self.linestyle,
            "marker": self.marker,
            "ms": 3,
            "lw": 1.2,
            "mfc": self.marker_face(),
        }


def run_styles(methods: dict[str, str], runs: list[str] | None = None) -> dict[str, RunStyle]:
    """run -> style for the ``runs`` a figure draws (default: all of ``methods``, config order).

    Colour comes from the run's method. The method's plain run (its first in ``methods``) is always
    solid with circles, so it reads the same in every figure; the method's other runs are numbered
    1, 2, ... in the order of ``runs`` and take line style and marker from that number.
    """
    runs = list(methods) if runs is None else list(runs)
    method_order = list(dict.fromkeys(methods.values()))
    plain = {}
    for run, method in methods.items():
        plain.setdefault(method, run)
    counters = {method: 0 for method in method_order}
    styles = {}
    for run in runs:
        method = methods[run]
        if run == plain[method]:
            k = 0
        else:
            counters[method] += 1
            k = counters[method]
        color = color_for(method, method_order.index(method))
        styles[run] = RunStyle(color, LINE_STYLES[k % len(LINE_STYLES)], MARKERS[k % len(MARKERS)], k % 2 == 0)
    return styles


def apply_style() -> None:
    plt.rcParams.update(RC)


def new_figure(height_in: float = 2.6):
    """One axes at paper-column width (3.4 in)."""
    apply_style()
    return plt.subplots(figsize=(COLUMN_WIDTH_IN, height_in), constrained_layout=True)


def new_grid(nrows: int, ncols: int, height_in: float, double: bool = True, **kwargs):
    """A grid of axes at double-column (7 in) or column (3.4 in) width; ``axes`` is always 2-D."""
    apply_style()
    width = DOUBLE_WIDTH_IN if double else COLUMN_WIDTH_IN
    return plt.subplots(nrows, ncols, figsize=(width, height_in), constrained_layout=True, squeeze=False, **kwargs)


def legend_columns(labels: list[str], width_in: float) -> int:
    """How many legend columns of these labels fit in ``width_in`` at 7 pt."""
    longest = max((len(label) for label in labels), default=1)
    per_column_in = 0.45 + 0.055 * longest  # handle + text
    return max(1, min(len(labels), int(width_in // per_column_in)))


def legend_height(labels: list[str], width_in: float = COLUMN_WIDTH_IN) -> float:
    """Inches a legend_below of these labels takes: add it to the figure height so the axes keep theirs."""
    ncol = legend_columns(labels, width_in)
    return 0.15 + 0.13 * -(-len(labels) // ncol)


def legend_below(fig, handles, labels, width_in: float | None = None) -> None:
    """One legend for the whole figure, under the axes, in as many columns as the width allows."""
    if not handles:
        return
    ncol = legend_columns(labels, width_in if width_in is not None else fig.get_figwidth())
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)


def save(fig, out_prefix: Path, dpi: int = DPI) -> list[Path]:
    outputs = []
    for ext in ("png", "pdf"):
        path = Path(f"{out_prefix}.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=dpi)
        outputs.append(path)
    plt.close(fig)
    return outputs

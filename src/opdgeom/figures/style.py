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
# The k-th run of a method (in config order) gets LINE_STYLES[k % 4] and MARKERS[k % 7]:
# 28 distinct combinations before any repeats, so every run of a method stays distinguishable.
LINE_STYLES = ["-", "--", ":", "-."]
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
    linestyle: str
    marker: str

    def line(self) -> dict:
        """Keyword arguments for ``ax.plot``."""
        return {"color": self.color, "ls": self.linestyle, "marker": self.marker, "ms": 3, "lw": 1.2}


def run_styles(methods: dict[str, str]) -> dict[str, RunStyle]:
    """run -> style: colour from the run's method, line style and marker from its rank within the method.

    Computed over the whole ``methods`` mapping (config order), so a run looks the same in every figure
    whichever subset of runs that figure draws.
    """
    seen: dict[str, int] = {}
    methods_seen: list[str] = []
    styles = {}
    for run, method in methods.items():
        if method not in methods_seen:
            methods_seen.append(method)
        k = seen.get(method, 0)
        seen[method] = k + 1
        color = color_for(method, methods_seen.index(method))
        styles[run] = RunStyle(color, LINE_STYLES[k % len(LINE_STYLES)], MARKERS[k % len(MARKERS)])
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


def legend_below(fig, handles, labels, width_in: float | None = None) -> None:
    """One legend for the whole figure, under the axes, in as many columns as the width allows."""
    if not handles:
        return
    width = width_in if width_in is not None else fig.get_figwidth()
    longest = max(len(label) for label in labels)
    per_column_in = 0.45 + 0.055 * longest  # handle + text at 7 pt
    ncol = max(1, min(len(labels), int(width // per_column_in)))
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

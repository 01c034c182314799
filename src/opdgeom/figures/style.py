"""One style for every figure: a fixed colour per method (Okabe-Ito, colour-blind safe),
paper-column size, and atomic PNG+PDF output."""

from __future__ import annotations

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
FALLBACK_COLORS = ["#E69F00", "#56B4E9", "#F0E442", "#999999"]
COLUMN_WIDTH_IN = 3.4


def color_for(method: str, index: int = 0) -> str:
    return METHOD_COLORS.get(method, FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


def new_figure(height_in: float = 2.6):
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7})
    return plt.subplots(figsize=(COLUMN_WIDTH_IN, height_in), constrained_layout=True)


def save(fig, out_prefix: Path) -> list[Path]:
    outputs = []
    for ext in ("png", "pdf"):
        path = Path(f"{out_prefix}.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=200)
        outputs.append(path)
    plt.close(fig)
    return outputs

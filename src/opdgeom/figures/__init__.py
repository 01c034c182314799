"""One function per figure or table: long-format tables in, files out (``<prefix>.<ext>``).

Every function is ``fn(inputs: list[Path], out_prefix: Path, **options)``; options always include
``methods`` (run -> method, config order). Each figure writes <prefix>.png, <prefix>.pdf and the
plotted data as <prefix>.csv; bad input raises ValueError naming the file, run or metric.
"""

from opdgeom.figures.accuracy import accuracy_figure
from opdgeom.figures.budget import budget_figure
from opdgeom.figures.drift import drift_figure
from opdgeom.figures.findings import findings
from opdgeom.figures.heatmap import heatmap_figure
from opdgeom.figures.localization import localization_figure
from opdgeom.figures.rotation import rotation_figure
from opdgeom.figures.sufficiency import sufficiency_figure
from opdgeom.figures.table1 import table1
from opdgeom.figures.trajectory import TRAJECTORY_FIGURES, make_trajectory_figure

FIGURES = {
    "table1": table1,
    "accuracy": accuracy_figure,
    "rotation": rotation_figure,
    "drift": drift_figure,
    "localization": localization_figure,
    **{name: make_trajectory_figure(name) for name in ("fig4a", "fig4b", "fig4c", "fig5")},
    "fig6": sufficiency_figure,
    **{name: make_trajectory_figure(name) for name in ("fig7a", "fig7b", "fig7c")},
    "heatmap": heatmap_figure,
    "budget": budget_figure,
    "findings": findings,
}
assert set(TRAJECTORY_FIGURES) <= set(FIGURES)

__all__ = [
    "FIGURES",
    "accuracy_figure",
    "budget_figure",
    "findings",
    "drift_figure",
    "heatmap_figure",
    "localization_figure",
    "rotation_figure",
    "sufficiency_figure",
    "table1",
]

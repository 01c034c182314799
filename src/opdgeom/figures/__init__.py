"""One function per figure or table: long-format tables in, files out (``<prefix>.<ext>``)."""

from opdgeom.figures.accuracy import accuracy_figure
from opdgeom.figures.table1 import table1

FIGURES = {"table1": table1, "accuracy": accuracy_figure}

__all__ = ["FIGURES", "accuracy_figure", "table1"]

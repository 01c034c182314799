"""Diagnose checkpoints trained anywhere (this workflow, TRL, verl, PEFT, the HF cache) with the study's
tables and figures, and one offline HTML page: ``opdgeom diagnose BASE RUN... --out DIR``."""

from opdgeom.diagnose.pipeline import Settings, diagnose

__all__ = ["Settings", "diagnose"]

"""One long-format table row: the shared builder of compare and trajectory tables."""

from __future__ import annotations

from opdgeom.geometry.stream import TensorInfo


def metric_row(
    tensor: str, info: TensorInfo, metric: str, parameters: int, value: float, step: int | None = None
) -> dict:
    """(step,) tensor, kind, layer, module, metric, parameters, value; ``step`` only for trajectory rows."""
    row = {} if step is None else {"step": step}
    row.update(
        tensor=tensor,
        kind=info.kind,
        layer=info.layer,
        module=info.module,
        metric=metric,
        parameters=parameters,
        value=float(value),
    )
    return row

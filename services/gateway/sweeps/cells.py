"""A sweep's grid expanded into cells, each resolved as a generation of its own.

Every cell is checked before the job exists, so a value no preset accepts is a 422 that
names its axis and position (``axes.0.values.3``) rather than a cell failing on a worker.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError as PydanticValidationError

from shared.errors import ValidationFailed
from shared.specs import GenerationSpec, SweepCell, SweepSpec


def sweep_cells(sweep: SweepSpec, *, resolve: Any) -> list[SweepCell]:
    """Expand the grid; ``resolve`` turns each cell's spec into a resolved one (raising
    :class:`ValidationFailed`), and errors are re-addressed to ``axes.N.values.M``."""
    cols = sweep.axes[0]
    rows = sweep.axes[1] if len(sweep.axes) > 1 else None
    base = sweep.base.model_dump(mode="json", exclude_unset=True)
    cells: list[SweepCell] = []
    errors: list[dict[str, Any]] = []
    for r, row_value in enumerate(rows.values if rows else [None]):
        for c, col_value in enumerate(cols.values):
            fields = dict(base)
            labels: dict[str, Any] = {cols.param: col_value}
            fields[cols.param] = col_value
            if rows is not None:
                fields[rows.param] = row_value
                labels[rows.param] = row_value
            try:
                spec = resolve(GenerationSpec.model_validate(fields))
            except ValidationFailed as exc:
                for error in exc.errors:
                    # A field no axis varies (e.g. strength x steps) fails because of this
                    # cell's combination: name the column value and say which cell it is.
                    on_rows = rows is not None and error["field"] == rows.param
                    axis, index = (1, r) if on_rows else (0, c)
                    where = "" if error["field"] in (cols.param, rows.param if rows else None) \
                        else f" (cell {labels}: {error['field']})"
                    errors.append({"field": f"axes.{axis}.values.{index}",
                                   "message": error["message"] + where})
                continue
            except PydanticValidationError as exc:
                for detail in exc.errors():
                    loc = detail.get("loc") or ()
                    axis = 1 if rows is not None and loc and loc[0] == rows.param else 0
                    index = c if axis == 0 else r
                    errors.append({"field": f"axes.{axis}.values.{index}",
                                   "message": str(detail.get("msg"))})
                continue
            cells.append(SweepCell(index=len(cells), row=r, col=c, labels=labels, spec=spec))
    if errors:
        unique = {(e["field"], e["message"]): e for e in errors}
        raise ValidationFailed(list(unique.values()))
    return cells

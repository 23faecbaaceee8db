"""The eval table the card and ``hubtool eval`` show, from the record's results alone.

Rows are task/metric, columns the 16-bit source first and then each int4 variant; the average is the mean
of each task's primary metric over the tasks where higher is better and the value is a fraction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import record
from ..record import source_label
from .metrics import mean


@dataclass
class EvalRow:
    """One task/metric across models: values, standard errors and sample counts per column."""

    task: str
    metric: str
    kind: str
    higher_is_better: bool
    primary: bool
    values: dict[str, float | None] = field(default_factory=dict)
    stderrs: dict[str, float | None] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> bool:
        """Whether the metric is a fraction best shown as a percentage (accuracy, F1, ...)."""
        vals = [v for v in self.values.values() if v is not None]
        return (
            self.kind != "perplexity" and "perplexity" not in self.metric and all(0 <= v <= 1 for v in vals)
        )


@dataclass
class EvalTable:
    """The eval table: one column per model (16-bit first, then each int4 variant), rows, and the average."""

    columns: list[str]
    rows: list[EvalRow]
    average: dict[str, float | None]
    average_of: list[str]  # "task/metric" of the rows averaged

    def format(self, row: EvalRow | None, model: str, digits: int = 2) -> str:
        """A cell as text: fractions as percentages, perplexity as is; "–" when missing (row None: average)."""
        v = self.average.get(model) if row is None else row.values.get(model)
        if v is None:
            return "–"
        return f"{100 * v:.{digits}f}" if row is None or row.percent else f"{v:.{digits}f}"


def eval_table(rec: record.RunRecord, primary_only: bool = False) -> EvalTable:
    """Table data for the card from the record's evals: rows task/metric, columns 16-bit + variants, average.

    The average is the mean of each task's primary metric over tasks where higher is better and the
    value is a fraction (perplexity is left out); a column missing one of those rows gets no average.
    """
    base = source_label(rec)
    columns = [base] + [v.name for v in rec.variants]
    for r in rec.evals:
        if r.model not in columns:
            columns.append(r.model)
    rows: dict[tuple[str, str], EvalRow] = {}
    for r in rec.evals:
        primary = bool(r.extra.get("primary", False))
        if primary_only and not primary:
            continue
        row = rows.get((r.task, r.metric))
        if row is None:
            row = rows[(r.task, r.metric)] = EvalRow(r.task, r.metric, r.kind, r.higher_is_better, primary)
        row.primary = row.primary or primary
        row.values[r.model] = r.value
        row.stderrs[r.model] = r.stderr
        row.n[r.model] = r.n
    table_rows = list(rows.values())
    for row in table_rows:  # every row has every column (None where a model lacks the result)
        row.values = {c: row.values.get(c) for c in columns}
        row.stderrs = {c: row.stderrs.get(c) for c in columns}
        row.n = {c: row.n.get(c, 0) for c in columns}
    averaged = [row for row in table_rows if row.primary and row.higher_is_better and row.percent]
    average: dict[str, float | None] = {}
    for col in columns:
        vals = [row.values.get(col) for row in averaged]
        average[col] = mean(vals) if vals and all(v is not None for v in vals) else None  # type: ignore[arg-type]
    return EvalTable(columns, table_rows, average, [f"{r.task}/{r.metric}" for r in averaged])

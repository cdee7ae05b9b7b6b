"""Fixed-width tables for the benchmarks' reports: a header, a rule, one line per row.

print_table([Column("scenario", 18, left=True), Column("events/s", 11, ",.0f")], rows)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column: its title, its width in characters, how its numbers are formatted
    (a format spec; strings are printed as they are) and its alignment."""

    title: str
    width: int
    spec: str = ""
    left: bool = False

    def _fit(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"

    def cell(self, value: object) -> str:
        return self._fit(value if isinstance(value, str) else format(value, self.spec))


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> None:
    """Print the header, a rule as wide as the header, then each row's cells."""
    header = "".join(column._fit(column.title) for column in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print("".join(column.cell(value) for column, value in zip(columns, row, strict=True)))

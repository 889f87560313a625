"""Read back the benchmark tables committed under results/.

    from benchmarks.results import load_tables, find_table
    tables = load_tables("results/pallas_lightning_h100.txt")
    sweep = find_table(tables, "32768-token sweep")
    [(r["L"], r["fwd ms"]) for r in sweep.rows if r["op"] == "lightning pallas"]

The files are the benchmarks' printed output: free text lines around tables in the
format of `benchmarks.common.format_table` (a header line, a rule of dashes with one
group per column, then the rows; columns separated by at least two spaces, so a cell
may contain single spaces, e.g. "B4 L2048 D1536 N16" or "1.00 / 1.00"). The rule's
dash groups give the column spans, which holds for left- and right-aligned columns.
The line above the header, when it is free text, is the table's title.

A row ends the table when it does not fit the spans (a blank line, an empty cell
before the last, text across a column gap) or when it is the header of the next
table. Cells become int or float where they parse as one, None for "-" or an empty
last cell, and stay strings otherwise ("failed: ValueError", "1.00 / 1.00").
"""

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results")

_RULE = re.compile(r"^-+(  -+)*$")
_INT = re.compile(r"^[+-]?\d+$")


@dataclasses.dataclass(frozen=True)
class Table:
  """One parsed table: its title line (or None), column names and rows (dicts keyed
  by column name)."""

  title: str | None
  columns: tuple[str, ...]
  rows: tuple[dict[str, Any], ...]

  def column(self, name: str) -> list[Any]:
    """The values of one column, in row order."""
    if name not in self.columns:
      raise ValueError(f"table {self.title!r} has no column {name!r}; columns: {self.columns}")
    return [r[name] for r in self.rows]

  def where(self, **equal) -> list[dict[str, Any]]:
    """Rows whose cells equal the keyword values, e.g. where(op="lightning pallas").
    Column names with spaces: where(**{"fwd ms": 0.2})."""
    for name in equal:
      if name not in self.columns:
        raise ValueError(f"table {self.title!r} has no column {name!r}; columns: {self.columns}")
    return [r for r in self.rows if all(r[k] == v for k, v in equal.items())]


def parse_value(cell: str) -> Any:
  """"-" or "" -> None; ints and floats -> numbers; other text unchanged."""
  cell = cell.strip()
  if cell in ("-", ""):
    return None
  if _INT.match(cell):
    return int(cell)
  try:
    return float(cell)
  except ValueError:
    return cell


def _spans(rule: str) -> list[tuple[int, int]]:
  return [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]


def _cells(line: str, spans: Sequence[tuple[int, int]]) -> list[str] | None:
  """The cells of `line` cut at the rule's spans, or None when the line does not fit:
  text in a gap between columns, or an empty cell other than the last (a trailing
  text column may be empty)."""
  line = line.rstrip()
  cells = []
  for i, (start, end) in enumerate(spans):
    last = i == len(spans) - 1
    gap_end = spans[i + 1][0] if not last else None
    if not last and line[end:gap_end].strip():
      return None
    cell = line[start:] if last else line[start:end]
    if (not cell.strip() and not last) or (i == 0 and line[:start].strip()):
      return None
    cells.append(cell.strip())
  return cells


def parse_tables(text: str) -> list[Table]:
  """Every table in a benchmark's printed output, in order."""
  lines = text.splitlines()
  rules = [i for i, line in enumerate(lines) if i > 0 and _RULE.match(line.strip())
           and line == line.lstrip()]
  tables = []
  taken = -1  # index of the last line that belongs to a table
  for n, r in enumerate(rules):
    spans = _spans(lines[r])
    header = _cells(lines[r - 1], spans)
    if header is None or r - 1 <= taken:
      continue  # a stray line of dashes, not a table's rule
    title = None
    if r - 2 > taken and r >= 2:
      candidate = lines[r - 2].strip()
      if candidate and candidate != lines[r - 1].strip() and not _RULE.match(candidate):
        title = candidate
    next_header = rules[n + 1] - 1 if n + 1 < len(rules) else len(lines)
    rows = []
    i = r + 1
    while i < next_header:
      cells = _cells(lines[i], spans)
      if cells is None:
        break
      rows.append({name: parse_value(c) for name, c in zip(header, cells)})
      i += 1
    # A title line directly above the next header that happens to fit these spans
    # would be read as a row; the benchmarks' titles are free text that does not.
    taken = i - 1
    tables.append(Table(title, tuple(header), tuple(rows)))
  return tables


def load_tables(path: str) -> list[Table]:
  """`parse_tables` of a results file (see `resolve` for where it is looked up)."""
  with open(resolve(path), encoding="utf-8") as f:
    return parse_tables(f.read())


def resolve(path: str) -> str:
  """Where a results file is: a bare file name ("pallas_scan_h100.txt") is in results/;
  a path with a directory is taken as given when it exists (absolute, or relative to the
  working directory), else its file name is looked up in results/."""
  if os.path.dirname(path) and (os.path.isabs(path) or os.path.exists(path)):
    return path
  return os.path.join(RESULTS_DIR, os.path.basename(path))


def find_table(tables: Sequence[Table], title_contains: str) -> Table:
  """The first table whose title contains the text (ValueError listing the titles)."""
  for t in tables:
    if t.title is not None and title_contains in t.title:
      return t
  raise ValueError(f"no table titled with {title_contains!r}; titles: "
                   f"{[t.title for t in tables]}")


def first_line(path: str) -> str:
  """The first line of a results file (the benchmarks print the device and versions
  there)."""
  with open(resolve(path), encoding="utf-8") as f:
    return f.readline().strip()


def measured_on(readme: str = "README.md") -> str | None:
  """The date in results/README.md's "measured on YYYY-MM-DD" line (None if absent)."""
  with open(resolve(readme), encoding="utf-8") as f:
    m = re.search(r"measured on (\d{4}-\d{2}-\d{2})", f.read())
  return m.group(1) if m else None

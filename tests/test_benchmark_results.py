"""benchmarks.results: parsing the benchmark tables committed under results/."""

import pytest

from benchmarks.common import format_table
from benchmarks.results import (RESULTS_DIR, find_table, first_line, load_tables, measured_on,
                                parse_tables, parse_value, resolve)


def test_round_trip_of_format_table_with_titles_text_and_missing_cells():
  # Given two printed tables with free text around them, text cells holding single
  # spaces, right-aligned numbers and missing values
  rows_a = [{"op": "selective scan", "shape": "B4 L2048", "ms": 2.0581, "x": "1.00 / 1.00"},
            {"op": "linear scan", "shape": "B8 L4096", "ms": None, "x": "failed: ValueError"}]
  rows_b = [("xla", 1024, 1.5e-7), ("pallas", 65536, 12345.0)]
  text = "\n".join([
      "jax 0.11.2, device NVIDIA H100",
      "first table",
      format_table(rows_a, ["op", "shape", "ms", "x"]),
      "second table (B = 32768 / L)",
      format_table(rows_b, ["impl", "L", "err"]),
      "",
      "# a trailing note",
  ])
  # When parsed
  a, b = parse_tables(text)
  # Then titles, columns and typed values come back
  assert a.title == "first table" and a.columns == ("op", "shape", "ms", "x")
  assert a.rows == ({"op": "selective scan", "shape": "B4 L2048", "ms": 2.058, "x": "1.00 / 1.00"},
                    {"op": "linear scan", "shape": "B8 L4096", "ms": None,
                     "x": "failed: ValueError"})
  assert b.title == "second table (B = 32768 / L)"
  assert b.rows == ({"impl": "xla", "L": 1024, "err": 1.5e-7},
                    {"impl": "pallas", "L": 65536, "err": 12345.0})
  assert b.column("L") == [1024, 65536] and b.where(impl="pallas")[0]["L"] == 65536
  with pytest.raises(ValueError, match="no column"):
    b.column("ms")


def test_table_without_title_and_a_short_line_after_it_ends_the_table():
  text = format_table([("a", 1), ("b", 2)], ["name", "value"]) + "\nshort\n"
  (t,) = parse_tables(text)
  assert t.title is None and [r["name"] for r in t.rows] == ["a", "b"]


def test_empty_last_text_cell_is_none_and_a_lone_first_cell_is_not_a_row():
  text = "\n".join([
      "title",
      "task  n   note",
      "----  --  ----------",
      "mqar  20",
      "ab    3   fine",
      "long title line",
  ])
  (t,) = parse_tables(text)
  assert t.rows == ({"task": "mqar", "n": 20, "note": None},
                    {"task": "ab", "n": 3, "note": "fine"})


def test_parse_value():
  assert parse_value(" 12 ") == 12 and parse_value("-3") == -3
  assert parse_value("1.3e-06") == 1.3e-6 and parse_value("98.328") == 98.328
  assert parse_value("-") is None and parse_value("") is None
  assert parse_value("B1 L65536") == "B1 L65536"


def test_committed_scan_results():
  tables = load_tables("results/pallas_scan_h100.txt")
  assert "H100" in first_line("results/pallas_scan_h100.txt")
  speed = find_table(tables, "scans on")
  row = speed.where(op="selective_scan", impl="pallas", dtype="float32")[0]
  # typed cells (the numbers change whenever the benchmark is rerun)
  assert row["shape"] == "B4 L2048 D1536 N16"
  assert isinstance(row["fwd_ms"], float) and 0 < row["pipe_fwd"] <= row["fwdbwd_ms"]
  assert len(row["x_vs_xla"].split(" / ")) == 2
  long = find_table(tables, "long sequence")
  assert [r["impl"] for r in long.rows] == ["pallas", "xla"]
  with pytest.raises(ValueError, match="no table titled"):
    find_table(tables, "not there")


def test_committed_lightning_sweep():
  sweep = find_table(load_tables("pallas_lightning_h100.txt"), "32768-token sweep")
  ours = sweep.where(op="lightning pallas")
  assert [r["L"] for r in ours] == [2048, 4096, 8192, 16384, 32768, 65536]
  assert all(r["B"] * r["L"] == 32768 for r in ours if r["L"] <= 32768)
  assert len(sweep.rows) == 30 and ours[0]["fwd ms"] == 0.114


def test_resolve_and_date(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "README.md").write_text("not the results readme")
  assert resolve("README.md") == f"{RESULTS_DIR}/README.md"   # bare names: results/
  assert resolve("results/README.md") == f"{RESULTS_DIR}/README.md"
  own = tmp_path / "mine.txt"
  own.write_text("x")
  assert resolve(str(own)) == str(own) and resolve("./mine.txt") == "./mine.txt"
  date = measured_on()
  assert date is not None and len(date) == 10 and date.startswith("20")

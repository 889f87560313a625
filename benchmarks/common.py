"""Timing and table helpers shared by the benchmarks.

    from benchmarks.common import time_fn, print_table
    ms = 1e3 * time_fn(jax.jit(f), x)            # median seconds of 20 timed calls
    print_table([{"op": "f", "ms": ms}], ["op", "ms"])

Time jit-compiled functions and pass the arrays they read as arguments: a closure
over arrays bakes them into the program as constants, which XLA may fold away.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax


def _median_seconds(fn: Callable, args, run: Callable, *, warmup: int, repeats: int) -> float:
  """`warmup` untimed calls of fn(*args), then the median wall time of `repeats` runs of
  run() (which waits for its own outputs)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_fn(fn: Callable, *args, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time of fn(*args) in seconds, over `iters` timed calls.

  `warmup` untimed calls come first (the first compiles a jitted fn). Every call
  waits for its outputs (jax.block_until_ready), since JAX dispatches asynchronously.
  """
  if iters < 1 or warmup < 0:
    raise ValueError(f"time_fn: need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
  return _median_seconds(fn, args, lambda: jax.block_until_ready(fn(*args)), warmup=warmup,
                         repeats=iters)


def time_fn_pipelined(fn: Callable, *args, calls: int = 20, repeats: int = 5,
                      warmup: int = 3) -> float:
  """Seconds per call of `calls` back-to-back dispatches waited for once, median over
  `repeats`: the device's throughput time, with the host's per-call launch cost hidden behind
  the queued work (as a training step sees it); time_fn's figure includes that cost."""
  if calls < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"time_fn_pipelined: need calls, repeats >= 1, warmup >= 0")

  def burst():
    for _ in range(calls):  # one stream runs them in order: the last finishes last
      out = fn(*args)  # earlier outputs are freed as they go (holding them all inflates memory)
    jax.block_until_ready(out)

  return _median_seconds(fn, args, burst, warmup=warmup, repeats=repeats) / calls


def device_name() -> str:
  """The default device, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
  dev = jax.devices()[0]
  return getattr(dev, "device_kind", None) or dev.platform


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if value == 0 or 1e-3 <= abs(value) < 1e5:
      return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3g}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str]) -> str:
  """An aligned text table. Rows are dicts keyed by column name (missing keys print
  "-") or sequences in column order. Numbers align right, text left."""
  cells, numeric = [], [True] * len(columns)
  for row in rows:
    values = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
    if len(values) != len(columns):
      raise ValueError(f"format_table: row {row!r} has {len(values)} cells, "
                       f"expected {len(columns)} ({list(columns)})")
    for i, v in enumerate(values):
      if v is not None and not isinstance(v, (int, float)):
        numeric[i] = False
    cells.append([_cell(v) for v in values])
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  align = lambda s, i: s.rjust(widths[i]) if numeric[i] else s.ljust(widths[i])
  lines = ["  ".join(align(c, i) for i, c in enumerate(columns)).rstrip(),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(align(s, i) for i, s in enumerate(r)).rstrip() for r in cells]
  return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str],
                *, title: str | None = None, file=None) -> None:
  """Print `format_table(rows, columns)`, with an optional title line above it."""
  out = file or sys.stdout
  if title:
    print(title, file=out)
  print(format_table(rows, columns), file=out, flush=True)


def _hlo_stack_frames(hlo_text: str) -> dict[str, str]:
  """stack_frame_id -> "file:line" of the frame's own location (the HLO text's FileNames,
  FileLocations and StackFrames tables); empty when the text has none."""
  def table(title):
    m = re.search(rf"^{title}\n(.*?)\n\n", hlo_text, re.M | re.S)
    return dict(re.findall(r"^(\d+) (.*)$", m.group(1), re.M)) if m else {}
  files = {k: v.strip('"') for k, v in table("FileNames").items()}
  locs = {}
  for k, v in table("FileLocations").items():
    f, ln = re.search(r"file_name_id=(\d+)", v), re.search(r"\bline=(\d+)", v)
    if f and ln:
      path = files.get(f.group(1), "?")
      locs[k] = ("site-packages" in path, f"{os.path.basename(path)}:{ln.group(1)}")
  raw = {}
  for k, v in table("StackFrames").items():
    loc, parent = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
    raw[k] = (locs.get(loc.group(1)) if loc else None, parent.group(1) if parent else None)
  frames = {}
  for k in raw:  # the innermost two frames outside installed packages (this repo's code)
    chain, seen, cur = [], set(), k
    while cur in raw and cur not in seen and len(chain) < 2:
      seen.add(cur)
      loc, cur = raw[cur][0], raw[cur][1]
      if loc and not loc[0]:
        chain.append(loc[1])
    if chain:
      frames[k] = "<".join(chain)
  return frames


def hlo_op_summaries(hlo_text: str, names) -> dict[str, str]:
  """For each op name (a fusion or instruction of the optimized HLO, as GPU traces name
  their kernels), a one-line summary read off `compiled.as_text()`: its result shape,
  the source lines and JAX op of its metadata (which layer made it), its operands' shapes.
  Names the text does not hold are left out."""
  shapes = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?\]\S*|\([^=]*?\)) ", hlo_text, re.M))
  frames = _hlo_stack_frames(hlo_text)
  out = {}
  # GPU traces write an instruction's dots as underscores (fusion.19 -> fusion_19)
  lines = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", hlo_text, re.M):
    lines.setdefault(m.group(1), m.group(2))
    lines.setdefault(m.group(1).replace(".", "_"), m.group(2))
  for name in names:
    line = lines.get(name)
    if line is None:
      continue
    result = line.split(" ", 1)[0]
    call = re.search(r"\b(fusion|custom-call|[\w-]+)\(([^)]*)\)", line)
    operands = [o.strip().lstrip("%") for o in call.group(2).split(",")] if call else []
    op_name = re.search(r'op_name="([^"]*)"', line)
    src = op_name.group(1)[-70:] if op_name else ""
    frame = re.search(r"stack_frame_id=(\d+)", line)
    if frame and frame.group(1) in frames:
      src = f"{frames[frame.group(1)]} {src}"
    ins = " ".join(shapes.get(o, o) for o in operands if o)
    out[name] = f"{result}" + (f" [{src}]" if src else "") + f" <- {ins}"
  return out


def optimized_hlo(dump_dir: str | None) -> str | None:
  """The newest train step's optimized HLO text in an XLA dump folder (None if absent): run
  with XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*"."""
  if not dump_dir:
    return None
  paths = glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt"))
  if not paths:
    print(f"no *train_step*after_optimizations.txt under {dump_dir}")
    return None
  with open(max(paths, key=os.path.getmtime)) as f:
    return f.read()


def summarise_trace(trace_dir: str, steps: int, top: int = 25, hlo_text: str | None = None) -> None:
  """Print the device time per op name of the newest Perfetto trace under trace_dir
  (written by jax.profiler.trace(..., create_perfetto_trace=True) around `steps` steps):
  ms per step, share of the device time, calls per step, the `top` largest. With the
  step's optimized HLO (`hlo_text`), each listed op gets a line below it with its shapes
  and JAX source op (`hlo_op_summaries`)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    print(f"no perfetto_trace.json.gz under {trace_dir}")
    return
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, n in names.items() if "GPU" in n or "TPU" in n or "device" in n.lower()}
  device = device or set(names)  # CPU: the XLA ops run on the host's threads
  totals, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      totals[e["name"]] += e.get("dur", 0.0)
      counts[e["name"]] += 1
  whole = sum(totals.values())
  print(f"\ndevice processes: {sorted(names[p] for p in device)}")
  print(f"device op time: {whole / 1e3 / steps:.3f} ms per step (summed over streams)")
  print(f"{'ms/step':>8} {'share':>6} {'calls/step':>10}  op")
  listed = totals.most_common(top)
  notes = hlo_op_summaries(hlo_text, [n for n, _ in listed]) if hlo_text else {}
  for name, dur in listed:
    print(f"{dur / 1e3 / steps:8.3f} {dur / whole:6.1%} {counts[name] / steps:10.1f}  {name[:110]}")
    if name in notes:
      print(f"{'':27}  {notes[name][:300]}")


def set_constants(assignments) -> None:
  """Sets module constants for A/B runs: each "pkg.module.NAME=VALUE" (VALUE a Python literal,
  else a string) sets NAME, which must exist already."""
  import ast  # noqa: PLC0415
  import importlib  # noqa: PLC0415
  for item in assignments:
    target, sep, text = item.partition("=")
    module_name, _, name = target.rpartition(".")
    if not sep or not module_name:
      raise ValueError(f"module constant: expected MODULE.NAME=VALUE, got {item!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
      raise ValueError(f"module constant: {module_name} has no constant {name}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    setattr(module, name, value)
    print(f"set {module_name}.{name} = {value!r}")

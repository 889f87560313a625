r"""Input-pipeline throughput: examples/s of the grain loader for every registered task.

  python -m benchmarks.input_pipeline                 # every task in data.registry.TASKS
  python -m benchmarks.input_pipeline --quick         # small generated sets, fewer batches
  python -m benchmarks.input_pipeline --tasks lm,mqar --batch-size 64 --workers 0

For each task: build the splits with data.load_task (generated tasks at a reduced size,
file-backed ones from ../shared/data; the first run prepares each task's TFDS dataset,
which for the file-backed ones may take minutes; build_s of later runs is the time to
read the prepared array_record files back), then time `--batches` train batches
(shuffle, drop_remainder, as the trainer draws them) after one warm-up batch (which also
waits for worker processes to start), with prefetch 0 (the cost of assembling a batch on
the calling thread), prefetch 2 (the trainer's default: a grain prefetch thread; the
consumer does no work here, so this shows its overhead, not overlap with a training
step) and, for each `--workers` count > 0, that many grain worker processes. ex_per_s is
over wall time; ex_per_cpu_s over this process's CPU time (prefetch threads included),
which a shared, loaded machine disturbs less. A task that cannot be built offline (its
files are missing) gets a row saying why. CPU only.
"""

from __future__ import annotations

import argparse
import importlib
import time

from benchmarks.common import print_table

# Sizes for generated tasks (keys are set only where the task's DEFAULTS has them).
GENERATED = {
    "listops": dict(num_train=2_000, num_val=100, num_test=100),
    "mqar": dict(num_train=20_000, num_test=100, seq_len=512, num_kv_pairs=64),
}
QUICK = {
    "listops": dict(num_train=200, num_val=20, num_test=20),
    "mqar": dict(num_train=2_000, num_test=50),
}


def task_config(name: str, quick: bool) -> dict:
  """config.data for one task: its defaults with the benchmark's size overrides."""
  from data.registry import TASKS
  module = importlib.import_module(TASKS[name].split(":")[0])
  defaults = getattr(module, "DEFAULTS", {})
  overrides = (QUICK if quick else GENERATED).get(name, {})
  return {"task": name, **{k: v for k, v in overrides.items() if k in defaults or not defaults}}


def measure(dataset, *, batch_size: int, batches: int, prefetch: int,
            workers: int = 0) -> tuple[float, float]:
  """(examples per second of wall time, per second of this process's CPU time) over
  `batches` train batches, after warm-up batches (one per worker process, and one more)."""
  from data.pipeline import make_loader
  with make_loader(dataset, batch_size=batch_size, shuffle=True, seed=0, drop_remainder=True,
                   prefetch=prefetch, worker_count=workers) as loader:
    for _ in range(1 + workers * loader.chunk):
      next(loader)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(loader)
    examples = batches * batch_size
    return (examples / (time.perf_counter() - start),
            examples / max(time.process_time() - cpu, 1e-9))


def bench_task(name: str, *, quick: bool, batch_size: int, batches: int,
               workers: tuple[int, ...] = (2,)) -> list[dict]:
  import data
  start = time.perf_counter()
  try:
    spec, splits = data.load_task(task_config(name, quick))
  except Exception as e:  # noqa: BLE001 (one task's failure should not end the table)
    return [dict(task=name, note=f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")]
  build_s = time.perf_counter() - start
  train = splits["train"]
  row_bytes = sum(a.nbytes for _, a in train.items()) / len(train)
  shape = "x".join(str(d) for d in train["inputs"].shape[1:])
  rows = []
  settings = [(0, 0), (2, 0)] + [(2, w) for w in workers if w > 0]
  for prefetch, n_workers in settings:
    eps, eps_cpu = measure(train, batch_size=batch_size, batches=batches, prefetch=prefetch,
                           workers=n_workers)
    rows.append(dict(task=name, kind=spec.kind, n_train=len(train), inputs=shape,
                     build_s=build_s, prefetch=prefetch, workers=n_workers, ex_per_s=eps,
                     # the workers' CPU is not this process's: no CPU figure for them
                     ex_per_cpu_s=eps_cpu if not n_workers else "-",
                     MB_per_s=eps * row_bytes / 1e6, note=""))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small generated sets, 20 batches")
  parser.add_argument("--tasks", default="", help="comma-separated task names; default: all")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=0, help="timed batches (default 200; 20 quick)")
  parser.add_argument("--workers", default="2", help="comma-separated grain worker counts "
                      "to time besides none (0: none)")
  args = parser.parse_args(argv)
  from data.registry import TASKS
  names = [t for t in args.tasks.split(",") if t] or list(TASKS)
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    parser.error(f"unknown task(s) {unknown}; registered: {sorted(TASKS)}")
  batches = args.batches or (20 if args.quick else 200)
  workers = tuple(int(w) for w in args.workers.split(",") if w)
  rows = []
  for name in names:
    rows += bench_task(name, quick=args.quick, batch_size=args.batch_size, batches=batches,
                       workers=workers)
  print_table(rows, ["task", "kind", "n_train", "inputs", "build_s", "prefetch", "workers",
                     "ex_per_s", "ex_per_cpu_s", "MB_per_s", "note"],
              title=f"Input pipeline (CPU, grain loader over TFDS array_record), batch "
                    f"{args.batch_size}, "
                    f"{batches} timed batches{' [quick]' if args.quick else ''}")
  return rows


if __name__ == "__main__":  # the guard grain's spawned worker processes need
  main()

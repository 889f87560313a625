r"""Build one config's data into the cache ($SSMLAB_CACHE) and exit: a long generation
(Pathfinder's images, ~400 s on the GPU machine's 16 cores) can then run in the
background of a device call that does other work, and the next call's training finds it.

    setsid nice -n 19 python3 scripts/gpu/prepare_data.py \
        --config=configs/lra/pathfinder.py:s4d,short --config.data.generator_version=3 \
        > /tmp/prepare.log 2>&1 &

Writes "prepared <task> in <s> s" as its last line (a caller waits for it).
"""

import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:arg]",
                                          lock_config=True)


def main(argv):
  del argv
  import data  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  task, splits = data.load_task(_CONFIG.value.data)
  sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
  print(f"prepared {task.name} ({sizes}) in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

"""Input pipelines: tasks as TFDS datasets read into NumPy, and a sharded grain loader.

    spec, splits = load_task(config.data)        # TaskSpec, {"train", "validation", "test"}
    loader = make_loader(splits["train"], batch_size=32, shuffle=True, seed=0,
                         drop_remainder=True)    # infinite; get_state()/set_state() resume

load_task prepares the task's TFDS dataset once (array_record, data/builders.py) and
reads it back with tfds.data_source (no TensorFlow); make_loader is a grain pipeline
(data/pipeline.py) whose iterator state goes into the checkpoint.

Tasks: see `data.registry.TASKS`: the LRA tasks "listops", "text", "retrieval", "image",
"pathfinder", "pathx"; the recall task "mqar"; language-modelling corpora "lm". Batches are dicts of NumPy
arrays; the keys per task kind are listed in `data.task` and data/pipeline.py.
"""

from data.pipeline import ArrayDataset, Loader, make_loader
from data.registry import TASKS, load_task, register_task
from data.task import TaskSpec

__all__ = ["ArrayDataset", "Loader", "TASKS", "TaskSpec", "load_task", "make_loader", "register_task"]

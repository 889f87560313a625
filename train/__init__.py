"""The trainer: `python -m train --config=... --workdir=...` or `train.trainer.run(config, workdir)`.

Modules: trainer (the run loop and pure jitted steps), optim (parameter groups and
schedules), sharding (mesh, shardings, multi-host), checkpoint (orbax, resume, best,
corruption fallback), metrics (losses, metrics.jsonl, TensorBoard files through
tensorboardX, a tqdm progress bar).
"""

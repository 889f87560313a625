#!/usr/bin/env bash
# The notebooks on a GPU (one device-tool call): their live branches time the XLA paths and
# the Pallas kernels there instead of plotting the committed numbers. The GPU machines have
# matplotlib but no Jupyter, so scripts/run_notebook.py runs the code cells in plain Python.
# Brings back the log and the figures ($OUT/notebooks.log, $OUT/notebook_figures.tgz).
#   usage (GPU machine, repo root, .whl carried): bash scripts/gpu/notebooks_live.sh [SECONDS]
set -u
secs=${1:-480}  # notebook 02 alone took 200 s on an H100, mostly compilation
source scripts/gpu/site.sh || exit 1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONWARNINGS=ignore::DeprecationWarning
nvidia-smi -L
t0=$(date +%s)
timeout $secs python3 scripts/run_notebook.py notebooks/*.ipynb --figures /tmp/nb_figures \
  > $OUT/notebooks.log 2>&1
echo "notebooks exit $? after $(( $(date +%s) - t0 )) s"
tar czf $OUT/notebook_figures.tgz -C /tmp nb_figures 2>/dev/null
grep -E "^(OK|FAILED)|took|measured|us/token|Error" $OUT/notebooks.log | grep -v "took 0\." | tail -40

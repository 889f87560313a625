# Sourced by the device scripts (repo root): installs .whl/*.whl into /tmp/site once per
# machine and puts /tmp/site and the repo on PYTHONPATH. A lock serialises scripts started
# together (a background run beside a benchmark), so that none installs over another's
# imports; on a warm machine the install is skipped (rm -rf /tmp/site to redo it).
#   usage: source scripts/gpu/site.sh || exit 1
mkdir -p /tmp/site
(
  flock 9
  [ -f /tmp/site/.installed ] || {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
  }
) 9>/tmp/site.lock && [ -f /tmp/site/.installed ] && export PYTHONPATH=/tmp/site:$PWD

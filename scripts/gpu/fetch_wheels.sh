#!/usr/bin/env bash
# Rebuild .whl/ (git-ignored): the wheels of the packages the GPU machine's image lacks
# (the device tool's KINDS.md lists what it has), for its Python 3.12, so that every
# scripts/gpu/*.sh call can `pip install --target /tmp/site .whl/*.whl`. Run here, in the
# repository root, on a machine that reaches PyPI. Carry .whl in the device call.
# Peers for the benchmarks (jax-linear-attention, fla-core) are added by name:
#   bash scripts/gpu/fetch_wheels.sh [EXTRA_PACKAGE ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pkgs=(ml-collections tensorboardX tensorflow-datasets array-record grain importlib-resources
      dm-tree immutabledict simple-parsing termcolor toml tensorflow-metadata
      googleapis-common-protos docstring-parser more-itertools portpicker "$@")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
python3 -m pip wheel -q --no-deps -w .whl promise   # tensorflow-datasets needs it; sdist only
ls .whl

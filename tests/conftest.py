import os

# Keep CPU test runs predictable on small machines: one Eigen thread per process.
# XLA:CPU's concurrency-optimised scheduler can order the interpreted warpgroups of a
# warp-specialised Pallas kernel (one thread each, blocking on simulated barriers) so
# that one of them never starts on a 2-core machine: the SSD forward then hangs.
_FLAGS = ("--xla_cpu_multi_thread_eigen=false",
          "--xla_cpu_enable_concurrency_optimized_scheduler=false")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in _FLAGS if f.split("=")[0] not in _flags]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import os

# Keep CPU test runs predictable on small machines: one Eigen thread per process.
# XLA:CPU's concurrency-optimised scheduler can order the interpreted warpgroups of a
# warp-specialised Pallas kernel (one thread each, blocking on simulated barriers) so
# that one of them never starts on a 2-core machine: the SSD forward then hangs.
# LLVM's optimisation level 0 for the CPU code XLA emits: the suite's programs are tiny, so
# their compile time is most of their cost (the tiny LM's trainer run: 10.5 -> 7.4 s, its
# four compiles 7.6 -> 4.1 s; interpreted Pallas kernels run about 10% faster overall).
# The HLO passes are unchanged; the emitted code may round the last bits differently
# (not checked bitwise), within every test's tolerance: the full suite passed with it.
_FLAGS = ("--xla_cpu_multi_thread_eigen=false",
          "--xla_cpu_enable_concurrency_optimized_scheduler=false",
          "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in _FLAGS if f.split("=")[0] not in _flags]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Under pytest-xdist (pyproject's addopts) each worker keeps its own data cache: two
# workers preparing the same TFDS dataset in one folder would race on its final rename.
# The folders are stable per worker id (kept between runs, as the default cache is); a
# cache the caller set ($SSMLAB_CACHE) is left alone.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("SSMLAB_CACHE"):
  os.environ["SSMLAB_CACHE"] = os.path.expanduser(
      f"~/.cache/ssmlab/pytest-{os.environ['PYTEST_XDIST_WORKER']}")

# One persistent compilation cache per test run, shared by the xdist workers and every
# subprocess they start (they inherit the variable the controller sets here, before it
# starts them): the trainer's programs repeat across tests (the same tiny config run,
# resumed, rerun under another setting), so only their first compile is paid. Removed at
# the end of the run; a cache the caller set ($JAX_COMPILATION_CACHE_DIR) is used and kept.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  import tempfile
  _OWN_CACHE = tempfile.mkdtemp(prefix="ssmlab-pytest-jax-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# Synchronous CPU dispatch. XLA:CPU runs a single-device program asynchronously when its
# inputs are not ready yet, and lets at most 32 be in flight per device; an interpreted
# Pallas kernel called eagerly is a long program whose host callbacks run jax ops of their
# own, so it could deadlock there: the test's next eager ops, queued behind the kernel,
# held all 32 slots while the kernel's callback waited for one (gdb on an xdist worker
# stuck for 10+ minutes in test_mamba::test_memory_caching_on_the_kernel_path_equals_xla:
# the main thread and the callback thread both in the compute semaphore; tests/
# test_conftest.py has the mechanism in a few lines). Timing-dependent, so it showed only
# on busy workers. Inline dispatch never queues anything behind a running program;
# multi-device programs (collectives) stay asynchronous. Imported after the variables
# above: JAX reads them when it starts.
import jax  # noqa: E402

jax.config.update("jax_cpu_enable_async_dispatch", False)


def pytest_unconfigure(config):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

"""The suite's own JAX setup (tests/conftest.py): synchronous CPU dispatch, and why.

Given a program with a host callback (every interpreted Pallas kernel is one) dispatched
while its input is still being computed, and 40 eager ops queued behind it before anything
waits, when the callback runs a jax op of its own, then under the suite's synchronous CPU
dispatch it finishes. Under XLA:CPU's default asynchronous dispatch the same script
deadlocked in 9 of 11 runs here (jaxlib 0.10.2): the queued ops hold the device's 32
in-flight slots, the callback's op waits for one, and they wait for the program it runs
in. That is what hung an xdist worker in test_mamba's memory caching on the kernel path.
The script runs in a subprocess with a timeout, so a regression fails instead of hanging
the suite.
"""

import os
import subprocess
import sys
import textwrap

import jax

SCRIPT = textwrap.dedent("""
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.experimental import io_callback
    jax.config.update("jax_cpu_enable_async_dispatch", False)   # as tests/conftest.py

    def callback(x):
      return np.asarray(jnp.asarray(x) + 1)        # a nested execution on the same device

    @jax.jit
    def slow(x, w, n):
      return x + jax.lax.fori_loop(0, n, lambda i, w: jnp.tanh(w @ w), w)[0, :3]

    @jax.jit
    def with_callback(x):
      return io_callback(callback, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    x, w = jnp.ones(3, jnp.float32), jnp.eye(512, dtype=jnp.float32)
    with_callback(slow(x, w, 1)).block_until_ready()   # compiled
    y = with_callback(slow(x, w, 300))                 # its input not ready at dispatch
    for _ in range(40):
      y = y + 1
    print("done", float(y[0]))
""")


def test_suite_dispatches_synchronously_on_the_cpu():
  assert jax.config.read("jax_cpu_enable_async_dispatch") is False


def test_host_callback_with_ops_queued_behind_it_finishes():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["done", "42.0"], proc.stdout

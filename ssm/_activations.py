"""The pointwise nonlinearities the mixers and the models' FFNs choose by name, in one place.

"gelu" is the exact (erf) GELU, as the S4 / S4D recipes and BERT use; "gelu_tanh" is
GPT-2's tanh approximation, which XLA can fuse into a matmul's epilogue on cuBLASLt.

    act = ACTIVATIONS["gelu"]; y = act(x)
"""

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}

"""discrim_jax: the discriminability-enforcing loss (Gini + KL on high-level
features) in JAX/Flax.

The library needs jax, flax and optax only: ``discrim_jax.losses``,
``.baseline_losses``, ``.representation``, ``.features`` and ``.models``.
The training app (``.train``, ``.data``, ``.compare``, ``.study`` and the
scripts in ``experiments/``) needs ``pip install 'discrim_jax[app]'``.
"""

__version__ = "0.2.0"

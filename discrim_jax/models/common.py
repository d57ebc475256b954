"""Pieces shared by the model modules."""

import contextlib
import functools
import threading

import jax
from jax import lax
import jax.numpy as jnp

# The bit pattern (a quiet NaN with a payload) on which the CPU barrier's loop
# runs twice instead of not at all; see ``_cpu_barrier``.
_SENTINEL = {2: 0x7FC3, 4: 0x7FC00123, 8: 0x7FF8000000000123}


def check_images(images) -> None:
  """Raises ValueError unless ``images`` is a rank-4 NHWC batch."""
  if images.ndim != 4:
    raise ValueError(
        f"expected NHWC images of rank 4, got shape {images.shape}")


def _cpu_barrier(x):
  # A while loop XLA cannot remove: it runs zero times, or twice (negating x
  # each time, which is exact) when x's first element has the sentinel bits.
  # Either way the result is x, bit for bit, in a buffer of its own.
  bits = jnp.dtype(f"int{8 * x.dtype.itemsize}")
  first = lax.bitcast_convert_type(x.reshape(-1)[0], bits)
  trips = 2 * (first == _SENTINEL[x.dtype.itemsize]).astype(jnp.int32)
  out, _ = lax.while_loop(lambda c: c[1] < trips,
                          lambda c: (-c[0], c[1] + 1), (x, jnp.int32(0)))
  return out


class _Switch(threading.local):
  enabled = True


_barriers = _Switch()


@contextlib.contextmanager
def fusion_barriers(enabled: bool):
  """Within this context, :func:`fusion_barrier` is (``enabled``) or is not a
  barrier. It acts when a function is traced: a jitted step keeps what was in
  force when it was traced (see :func:`with_fusion_barriers`). On by default;
  ``config.xla_cpu_fusion_barriers`` is the training app's switch."""
  before = _barriers.enabled
  _barriers.enabled = bool(enabled)
  try:
    yield
  finally:
    _barriers.enabled = before


def with_fusion_barriers(fn, enabled: bool):
  """``fn`` traced with fusion barriers on or off (the one place the training
  app's switch is applied: wrap a step before ``jax.jit``)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with fusion_barriers(enabled):
      return fn(*args, **kwargs)
  # A partial (the app's bound steps) has no name of its own: its function's
  # names the jitted program in profiles and compile logs ("jit(train_step)",
  # not "jit(wrapped)").
  inner = getattr(fn, "func", fn)
  wrapped.__name__ = wrapped.__qualname__ = getattr(inner, "__name__", "step")
  return wrapped


def fusion_barrier(x):
  """``x`` unchanged, in a buffer XLA:CPU does not fuse through (CPU only).

  XLA:CPU feeds each weight-gradient convolution a transposed copy of the
  convolution's input, and fuses the elementwise ops that produced that input
  (BatchNorm, ReLU, residual additions, across blocks) into the transpose: the
  chain is recomputed in transposed order, one cache miss per element. Behind
  this barrier the transpose reads a stored buffer instead; on a 2-core Xeon
  that takes ResNet-18's training step from about 37 to 43 images/s
  (``experiments/bench.py --levers``). On other platforms it is the identity.
  The gradient passes straight through. Off (the plain identity) inside
  ``fusion_barriers(False)``.

  Args:
    x: a floating-point array with at least one element.
  """
  return _barrier(x) if _barriers.enabled else x


@jax.custom_vjp
def _barrier(x):
  return lax.platform_dependent(x, cpu=_cpu_barrier, default=lambda v: v)


def _barrier_fwd(x):
  return _barrier(x), None


def _barrier_bwd(_, g):
  return (g,)


_barrier.defvjp(_barrier_fwd, _barrier_bwd)

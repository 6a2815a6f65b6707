"""Layout transforms between PyTorch and Flax parameter arrays.

Written with array methods only (``.T``, ``.transpose``, ``.reshape``) so that the same function
works on numpy arrays, jax arrays and `jax.ShapeDtypeStruct` tracers under `jax.eval_shape`
(used to compute expected shapes without allocating full-size weights).
"""


def identity(a):
    return a


def linear_to_flax(w):
    """``nn.Linear.weight`` (out, in) -> Dense ``kernel`` (in, out)."""
    return w.T


def linear_to_torch(k):
    """Dense ``kernel`` (in, out) -> ``nn.Linear.weight`` (out, in)."""
    return k.T


def conv_to_flax(w):
    """``nn.Conv2d.weight`` (out, in, kh, kw) -> Conv ``kernel`` (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def conv_to_torch(k):
    """Conv ``kernel`` (kh, kw, in, out) -> ``nn.Conv2d.weight`` (out, in, kh, kw)."""
    return k.transpose(3, 2, 0, 1)

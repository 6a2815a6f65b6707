"""A batch as R equal replicas: upstream's DDP processes, emulated inside one step.

Upstream trained the VA-VAE on 32 GPUs x 8 images under DDP. Each process took the adaptive
GAN / VF weights from the gradients of its own 8 images' losses, and normalised the
discriminator's BatchNorm with their statistics; the all-reduce then averaged the processes'
gradients. `LossConfig.ddp_replicas = R` splits the batch into R groups of consecutive images
and does the same (`vavae_jax.train_step`, `vavae_jax.discriminator.TorchBatchNorm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_replicas(a: jax.Array, replicas: int) -> jax.Array:
    """(B, ...) -> (R, B / R, ...): replica r holds images r * B / R ... (r + 1) * B / R - 1,
    consecutive shards of the batch (where R is a multiple of the devices sharding the batch,
    each device holds whole replicas)."""
    return a.reshape(replicas, a.shape[0] // replicas, *a.shape[1:])


def add_replica_axis(tree):
    """One replica: a leading axis of size 1 on every leaf."""
    return jax.tree.map(lambda a: a[None], tree)


def per_image(weights: jax.Array, like: jax.Array) -> jax.Array:
    """Per-replica weights (R,) as a (B, 1, ...) array that broadcasts against `like`."""
    batch = like.shape[0]
    return jnp.repeat(weights, batch // weights.shape[0]).reshape(
        (batch,) + (1,) * (like.ndim - 1))


def replica_pullbacks(fn, params, inputs, cotangents, replicas: int):
    """Pull each of `cotangents` (shaped as fn(params, inputs), batch first) back through fn
    on every replica's images separately, with the cotangents scaled by R: a cotangent of a
    whole-batch mean becomes, on each replica, that of the mean over its own B / R images (its
    loss on one DDP process).

    Returns, per cotangent, (parameter gradients (R, ...), input cotangents like `inputs`).
    fn's forward is recomputed, vmapped over the replicas (a loop over them would slice the
    sharded batch axis); the train step uses it for its two heads, one conv each."""

    def one_replica(inputs_r, cts_r):
        _, vjp = jax.vjp(fn, params, inputs_r)
        return [vjp(replicas * ct) for ct in cts_r]

    split = lambda a: split_replicas(a, replicas)
    out = jax.vmap(one_replica)(jax.tree.map(split, inputs), [split(c) for c in cotangents])
    merge = lambda a: a.reshape(-1, *a.shape[2:])
    return [(grads, jax.tree.map(merge, ct_in)) for grads, ct_in in out]

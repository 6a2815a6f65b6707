"""PatchGAN discriminator of the VA-VAE GAN loss (taming ``NLayerDiscriminator``), NHWC.

Architecture for ``n_layers=3`` (upstream ``main`` Sequential index -> Flax module name):

    main.0   conv0   Conv ndf,    k4 s2 p1, bias     (B, H/2,   W/2,   ndf)
             LeakyReLU(0.2)
    main.2   conv2   Conv 2ndf,   k4 s2 p1, no bias  (B, H/4,   W/4,   2ndf)
    main.3   bn3     BatchNorm, LeakyReLU(0.2)
    main.5   conv5   Conv 4ndf,   k4 s2 p1, no bias  (B, H/8,   W/8,   4ndf)
    main.6   bn6     BatchNorm, LeakyReLU(0.2)
    main.8   conv8   Conv 8ndf,   k4 s1 p1, no bias  (B, H/8-1, W/8-1, 8ndf)
    main.9   bn9     BatchNorm, LeakyReLU(0.2)
    main.11  conv11  Conv 1,      k4 s1 p1, bias     (B, H/8-2, W/8-2, 1)  logits

so a 256x256 image gives (B, 30, 30, 1) logits. Channel widths are ``ndf * min(2**n, 8)``.
Padding is PyTorch's: one zero row/column on every side, then a VALID convolution.

BatchNorm follows ``torch.nn.BatchNorm2d`` (eps 1e-5, PyTorch momentum 0.1):

* ``train=True``: normalise with the batch mean and the *biased* batch variance over
  (B, H, W), and update the running statistics with the *unbiased* variance
  (``var * n / (n - 1)``, n = B*H*W). ``flax.linen.BatchNorm`` uses the biased one for the
  update, hence the small module below. Call with ``mutable=['batch_stats']``.
* ``train=False``: normalise with the running statistics.

Under ``jit`` with a batch sharded across devices the statistics are those of the global batch
(like SyncBatchNorm); upstream's DDP run used per-GPU statistics (8 images per GPU). With
``replicas = R > 1`` the batch splits into R equal consecutive groups, each normalised with its
own statistics, as R DDP processes without SyncBN do; the running statistics then follow group
0's, because DDP broadcasts rank 0's buffers to every process before each forward pass
(``broadcast_buffers=True``, its default). The train step sets R from
``LossConfig.ddp_replicas``; the variables do not depend on it.

Variables::

    params/conv{i}/kernel (4, 4, C_in, C_out), params/conv{0,11}/bias (C_out,)
    params/bn{i}/scale (C,), params/bn{i}/bias (C,)
    batch_stats/bn{i}/mean (C,), batch_stats/bn{i}/var (C,)
    batch_stats/bn{i}/num_batches_tracked () int32

``num_batches_tracked`` is kept as a counter next to the running statistics so that a
PyTorch -> Flax -> PyTorch round trip is exact (it is written back as int64). With a fixed
momentum PyTorch only reports it; nothing here reads it.

The converter (torchport's protocol: `torch_rules`, `abstract_params`, `params_from_torch`,
`params_to_torch`) moves both collections; `model` defaults to upstream's ndf=64, n_layers=3.

Initialisation follows taming's ``weights_init``: conv kernels N(0, 0.02); conv biases keep
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm scale N(1, 0.02), bias 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from torchport import (
    Rule,
    abstract_variables,
    conv_to_flax,
    conv_to_torch,
    load_state_dict,
    source_name,
    to_flax,
    to_torch,
)
from vavae_jax.conv import conv_general_dilated

# Prefix of the discriminator entries inside a VA-VAE (LPIPSWithDiscriminator) checkpoint.
CHECKPOINT_PREFIX = "loss.discriminator."

_KERNEL_AXES = (None, None, "conv_in", "conv_out")


def _torch_conv_bias_init(fan_in: int):
    """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _normal_around_one(key, shape, dtype=jnp.float32):
    """taming's BatchNorm weight init, N(1, 0.02)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class TorchBatchNorm(nn.Module):
    """BatchNorm over the last axis with ``torch.nn.BatchNorm2d`` semantics (see module doc).

    momentum uses the Flax convention (weight of the old running value): 0.9 here is
    PyTorch's ``momentum=0.1``.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    replicas: int = 1  # train mode: statistics per group of B / replicas samples (module doc)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        channels = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(_normal_around_one, ("norm",)), (channels,)
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            (channels,),
        )
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        count = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )

        x32 = x.astype(jnp.float32)
        if not train:
            y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
            return y.astype(x.dtype)
        groups = self.replicas
        if groups < 1 or x.shape[0] % groups:
            raise ValueError(f"{self.name}: a batch of {x.shape[0]} does not split into "
                             f"{groups} equal replica groups")
        if groups > 1:  # (groups, B / groups, ..., C): statistics per group
            x32 = x32.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        axes = tuple(range(1 if groups > 1 else 0, x32.ndim - 1))
        n = x.size // (channels * groups)
        if n < 2:
            raise ValueError(f"BatchNorm in train mode needs > 1 value per channel, got {n}")
        mean = jnp.mean(x32, axis=axes, keepdims=groups > 1)
        var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=groups > 1)  # biased
        if not self.is_initializing():
            m = self.momentum
            # rank 0's statistics (the first group's)
            mean0, var0 = (mean[0].reshape(channels), var[0].reshape(channels)) if groups > 1 \
                else (mean, var)
            ra_mean.value = m * ra_mean.value + (1 - m) * mean0
            ra_var.value = m * ra_var.value + (1 - m) * var0 * (n / (n - 1))
            count.value = count.value + 1
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.reshape(x.shape).astype(x.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, H, W, 3) images in [-1, 1] -> (B, h, w, 1) logits.

    Upstream VA-VAE uses ``NLayerDiscriminator()`` (ndf=64, n_layers=3), always in train mode.
    """

    ndf: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32  # compute dtype of the convolutions
    replicas: int = 1  # BatchNorm statistics per replica group in train mode (see above)

    def _conv(self, x, features, stride, use_bias, name):
        fan_in = x.shape[-1] * 4 * 4
        out_axis = "conv_out" if features > 1 else None  # a size-1 axis cannot be sharded
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=use_bias,
            dtype=self.dtype,
            conv_general_dilated=conv_general_dilated,  # faster kernel gradient on CPU
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, "conv_in", out_axis)
            ),
            bias_init=nn.with_logical_partitioning(_torch_conv_bias_init(fan_in), (out_axis,)),
            name=name,
        )(x)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = self._conv(x, self.ndf, 2, True, "conv0")
        x = nn.leaky_relu(x, 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1  # the last BN block keeps the resolution
            x = self._conv(x, self.ndf * min(2**n, 8), stride, False, f"conv{3 * n - 1}")
            x = TorchBatchNorm(replicas=self.replicas, name=f"bn{3 * n}")(x, train=train)
            x = nn.leaky_relu(x, 0.2)
        return self._conv(x, 1, 1, True, f"conv{3 * self.n_layers + 2}")


# ----------------------------------------------------------------------------------------
# Conversion from / to PyTorch state dicts
# ----------------------------------------------------------------------------------------


def torch_rules(model: NLayerDiscriminator | None = None) -> list[Rule]:
    """Rule table: upstream ``main.{i}.*`` keys <-> ('params' | 'batch_stats', name, leaf)."""
    model = NLayerDiscriminator() if model is None else model
    last = 3 * model.n_layers + 2
    rules = []  # upstream's registration order: each conv, then the BatchNorm after it
    for i in [0] + [3 * n - 1 for n in range(1, model.n_layers + 1)] + [last]:
        rules.append(
            Rule(f"main.{i}.weight", ("params", f"conv{i}", "kernel"), conv_to_flax, conv_to_torch)
        )
        if i in (0, last):
            rules.append(Rule(f"main.{i}.bias", ("params", f"conv{i}", "bias")))
            continue
        i, name = i + 1, f"bn{i + 1}"
        rules += [
            Rule(f"main.{i}.weight", ("params", name, "scale")),
            Rule(f"main.{i}.bias", ("params", name, "bias")),
            Rule(f"main.{i}.running_mean", ("batch_stats", name, "mean")),
            Rule(f"main.{i}.running_var", ("batch_stats", name, "var")),
            Rule(
                f"main.{i}.num_batches_tracked",
                ("batch_stats", name, "num_batches_tracked"),
                lambda a: a.astype(np.int32),
            ),
        ]
    return rules


def abstract_params(model: NLayerDiscriminator | None = None) -> dict:
    """``{'params', 'batch_stats'}`` as unboxed ShapeDtypeStructs (nothing allocated)."""
    model = NLayerDiscriminator() if model is None else model
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    return abstract_variables(model, x, collections=("params", "batch_stats"), train=False)


def params_from_torch(
    source: str | os.PathLike | Mapping[str, Any], model: NLayerDiscriminator | None = None
) -> dict:
    """Upstream ``NLayerDiscriminator`` state dict (a file or a mapping) ->
    ``{'params': ..., 'batch_stats': ...}``.

    Accepts bare ``main.*`` keys or a full VA-VAE training checkpoint, from which only the
    ``loss.discriminator.*`` entries are taken. Raises `ConversionError` listing every missing,
    unexpected or mis-shaped key.
    """
    state_dict = load_state_dict(source, select=("state_dict",), under=CHECKPOINT_PREFIX)
    return to_flax(state_dict, torch_rules(model), abstract_params(model),
                   what="NLayerDiscriminator", source=source_name(source))


def params_to_torch(
    variables: Mapping, model: NLayerDiscriminator | None = None, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` -> upstream state dict (numpy; counters as int64).

    Use ``prefix="loss.discriminator."`` for the layout of a VA-VAE training checkpoint.
    """
    variables = {k: nn.unbox(variables[k]) for k in ("params", "batch_stats") if k in variables}
    state_dict = to_torch(variables, torch_rules(model), what="NLayerDiscriminator")

    def int64(v):  # abstract trees give ShapeDtypeStructs
        if isinstance(v, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(v.shape, np.int64)
        return v.astype(np.int64)

    return {prefix + k: int64(v) if k.endswith("num_batches_tracked") else v
            for k, v in state_dict.items()}

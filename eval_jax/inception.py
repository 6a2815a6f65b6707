"""The FID Inception-v3 network (pytorch-fid 0.3.0's ``fid_inception_v3``) as a Flax module.

This is the network every FID / sFID / IS / precision-recall number in the VA-VAE and
LightningDiT papers is computed with: the TensorFlow Inception graph of 2015-12-05
(``classify_image_graph_def.pb``), as ported to PyTorch by pytorch-fid. In torchvision terms it is
``Inception3(num_classes=1008, aux_logits=False, transform_input=False)`` with four patched block
types:

* ``FIDInceptionA`` (Mixed_5b/c/d), ``FIDInceptionC`` (Mixed_6b..e) and ``FIDInceptionE_1``
  (Mixed_7b): the 3x3 average pool of the pool branch ignores the zero padding
  (``count_include_pad=False``), as TensorFlow's average pool does;
* ``FIDInceptionE_2`` (Mixed_7c): the pool branch uses a 3x3 *max* pool.

Every convolution is a ``BasicConv2d``: conv without bias, BatchNorm (eps 0.001, running
statistics only: the network is never trained here) and ReLU.

Preprocessing (`InceptionV3.preprocess`), from [0, 255] images:

* ``'pytorch_fid'`` (the default) follows ``pytorch_fid.inception.InceptionV3(resize_input=True,
  normalize_input=True)``: pytorch-fid expects images in [0, 1] and resizes them to 299x299
  with ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing, also when
  shrinking), then maps them to [-1, 1] with ``2x - 1``. This module divides by 255 and then
  does exactly that. (`jax.image.resize` antialiases when downsampling, so the resize here is
  written out: `resize_bilinear`.) Features match pytorch-fid's to float32 rounding; upstream's
  rFID and quick-FID tools use them.
* ``'adm'`` follows the TensorFlow graph itself, which the ADM evaluator feeds [0, 255] images
  (at its ``ExpandDims:0`` node): TF1's ``ResizeBilinear`` to 299x299 (no half-pixel centres:
  `resize_bilinear_tf1`, equal to TensorFlow's), then its ``Sub`` 128 and ``Mul`` 1/128 nodes.
  The reference batches' statistics (``VIRTUAL_imagenet256_labeled.npz``) were computed so.

Outputs (`InceptionV3.__call__`), all float32:

* ``pool3`` (N, 2048): the final average pool, the FID / precision-recall feature
  (TF ``pool_3:0``; pytorch-fid's ``InceptionV3([3])`` output, squeezed).
* ``logits`` (N, 1008): ``fc(pool3)`` with the bias, i.e. torchvision's ``Inception3`` output.
* ``logits_unbiased`` (N, 1008): ``pool3 @ fc.weight.T`` without the bias. This is what the ADM
  evaluator's Inception Score uses: guided-diffusion ``evaluations/evaluator.py``,
  ``_create_softmax_graph``, takes the weight input of the graph's ``softmax/logits/MatMul`` op
  (``softmax/weights``, which pytorch-fid ported as ``fc.weight``) and computes
  ``tf.nn.softmax(tf.matmul(pool3, w))``; the ``softmax/biases`` add is never applied.
* ``spatial`` (N, 2023): ADM's sFID feature. The evaluator fetches ``mixed_6/conv:0``, keeps
  ``spatial[..., :7]`` (TF tensors are NHWC, so the first 7 channels) in
  ``_create_feature_graph``, and ``compute_activations`` flattens it with
  ``reshape([N, -1])``: 17 * 17 * 7 = 2023 values in (row, column, channel) order. In the TF
  graph mixed, mixed_1, mixed_2 are Mixed_5b/5c/5d, mixed_3 is Mixed_6a and mixed_4..mixed_7 are
  Mixed_6b..6e, so ``mixed_6`` is Mixed_6d; its ``conv`` is the 1x1 branch (pytorch-fid's
  ``branch1x1``; the graph's ``mixed_6/conv/Conv2D``, ``mixed_6/conv/batchnorm`` and then the
  node ``mixed_6/conv`` itself, the ReLU, so the tap is after BatchNorm + ReLU). The 17x17 grid
  assumes a 299x299 network input (always the case with ``resize_input=True``).

Parameter tree (names as torchvision's; `eval_jax.inception_convert` maps them)::

    params/<layer>/conv/kernel (kh, kw, C_in, C_out)
    params/<layer>/bn/{scale, bias} (C_out,)
    batch_stats/<layer>/bn/{mean, var} (C_out,)
    params/fc/{kernel (2048, 1008), bias (1008,)}

with <layer> = Conv2d_1a_3x3 ... Conv2d_4a_3x3 or Mixed_<k>/<branch>, e.g.
``Mixed_6d/branch7x7dbl_3``. Call as ``InceptionV3().apply(variables, images)`` with
``variables = {'params': ..., 'batch_stats': ...}``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

RESOLUTION = 299  # network input size after resizing
PREPROCESS = ("pytorch_fid", "adm")  # InceptionV3.preprocess
NUM_CLASSES = 1008  # the 2015 graph's softmax width (1000 ImageNet classes + 8 unused)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17  # Mixed_6d's grid for a 299x299 input
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Resize


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D linear resize, bit-identical to PyTorch's on CPU.

    For ``align_corners=False`` and an explicit output size, PyTorch samples output pixel i at
    ``src = scale * (i + 0.5) - 0.5`` with ``scale = in / out`` (both float32), clamped below at
    0; it mixes ``floor(src)`` and the next pixel (the last pixel when ``floor(src)`` is already
    the last) with weights ``1 - frac(src)`` and ``frac(src)``. No antialiasing filter, whatever
    the ratio. PyTorch's CPU kernel evaluates ``src`` with a fused multiply-add (one rounding);
    float64 holds the float32 product exactly, so one cast to float32 reproduces it.

    Returns (lo (out,), hi (out,), frac (out,) float32).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    i = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (i + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return lo, hi, frac


def _resize_axis(x: jnp.ndarray, axis: int, out_size: int) -> jnp.ndarray:
    in_size = x.shape[axis]
    if in_size == out_size:  # PyTorch's weights are then (1, 0): the identity
        return x
    lo, hi, frac = _linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    frac = jnp.asarray(frac, x.dtype).reshape(shape)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """(N, H, W, C) -> (N, size[0], size[1], C), equal to PyTorch's
    ``F.interpolate(x, size, mode='bilinear', align_corners=False)`` (``antialias=False``) for
    up- and downsampling alike. Separable: rows first, then columns."""
    return _resize_axis(_resize_axis(x, 1, size[0]), 2, size[1])


def _tf1_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of TF1's ``ResizeBilinear`` (``align_corners=False``,
    ``half_pixel_centers=False``, the 2015 Inception graph's op) along one axis.

    Output pixel i samples ``src = i * (in / out)`` (float32 product and quotient; no half-pixel
    offset), mixing ``floor(src)`` and ``ceil(src)`` (clamped to the last pixel) with weight
    ``src - floor(src)``. Returns (lo (out,), hi (out,), frac (out,) float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.maximum(np.floor(src).astype(np.int64), 0)
    hi = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    frac = (src - np.floor(src)).astype(np.float32)
    return lo, hi, frac


def _resize_axis_tf1(x: jnp.ndarray, axis: int, out_size: int) -> jnp.ndarray:
    if x.shape[axis] == out_size:  # src = i, frac = 0: the identity
        return x
    lo, hi, frac = _tf1_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    low = jnp.take(x, lo, axis=axis)
    # TF's form, a + (b - a) * t, rather than a (1 - t) + b t: they round differently
    return low + (jnp.take(x, hi, axis=axis) - low) * jnp.asarray(frac, x.dtype).reshape(shape)


def resize_bilinear_tf1(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """(N, H, W, C) -> (N, size[0], size[1], C) as TF1's ``tf.image.resize_bilinear`` with its
    defaults, the resize inside the Inception graph that the ADM evaluator runs: columns
    first within each row, then rows, as TF's kernel interpolates (equal to TensorFlow's to
    float32 rounding, see tests). Sample grid without half-pixel centres, so unlike
    `resize_bilinear` it shifts the image by up to half a source pixel."""
    return _resize_axis_tf1(_resize_axis_tf1(x, 2, size[1]), 1, size[0])


# ----------------------------------------------------------------------------------------------
# Layers and blocks


def _pool_3x3_same(x: jnp.ndarray, kind: str) -> jnp.ndarray:
    """3x3, stride 1, padding 1: average without the padded zeros (TF), or max."""
    pad = ((1, 1), (1, 1))
    if kind == "avg":
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=pad)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """``MaxPool2d(3, stride=2)``: no padding, floor mode. (N, H, W, C) -> (N, (H-3)//2+1, ...)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=0.001, running statistics) + ReLU.

    (N, H, W, C_in) -> (N, H', W', features), H' = (H + 2 * padding[0] - kernel[0]) // strides + 1.
    """

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    precision: Any = HIGHEST

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class _Block(nn.Module):
    """Base of the mixed blocks: `conv(name, features, kernel, ...)` builds a `BasicConv2d`."""

    dtype: Any = jnp.float32
    precision: Any = HIGHEST

    def conv(self, name: str, features: int, kernel, strides: int = 1, padding=(0, 0)):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return BasicConv2d(
            features,
            kernel,
            strides=strides,
            padding=tuple(padding),
            dtype=self.dtype,
            precision=self.precision,
            name=name,
        )


class InceptionA(_Block):
    """Mixed_5b/c/d (FIDInceptionA). (N, 35, 35, C) -> (N, 35, 35, 224 + pool_features)."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=(2, 2))(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_pool_3x3_same(x, "avg"))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (grid reduction). (N, 35, 35, 288) -> (N, 17, 17, 768)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..e (FIDInceptionC), factorised 7x7 convolutions.

    (N, 17, 17, 768) -> ((N, 17, 17, 768), branch1x1 output (N, 17, 17, 192)); the second value
    is ADM's sFID tap when the block is Mixed_6d.
    """

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_pool_3x3_same(x, "avg"))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Block):
    """Mixed_7a (grid reduction). (N, 17, 17, 768) -> (N, 8, 8, 1280)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b (FIDInceptionE_1, pool='avg') and Mixed_7c (FIDInceptionE_2, pool='max').

    (N, 8, 8, C) -> (N, 8, 8, 2048).
    """

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=(1, 1))(bd)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        bp = self.conv("branch_pool", 192, 1)(_pool_3x3_same(x, self.pool))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------------------------
# The network


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3, with its preprocessing or the ADM evaluator's graph's.

    Call: ``InceptionV3().apply({'params': p, 'batch_stats': s}, images)``.

    Args (of ``__call__``):
      images: (N, H, W, 3) RGB, **uint8 or float with values in [0, 255]** (not [0, 1], not
        [-1, 1]); any H, W. Resized to 299x299 when `resize_input` (see the module docstring).

    Returns:
      dict of float32 arrays: ``pool3`` (N, 2048), ``spatial`` (N, 2023) and, when
      ``num_classes > 0``, ``logits`` (N, num_classes) and ``logits_unbiased``
      (N, num_classes). See the module docstring for what each one is.

    Attributes:
      num_classes: width of the classifier ``fc``; 1008 for the released weights, 0 for none
        (pytorch-fid's ``InceptionV3`` module keeps no ``fc``: then no logits are returned).
      resize_input: resize to 299x299 (`preprocess` says how). With False the input must
        already be the network's size for the outputs to mean anything.
      preprocess: 'pytorch_fid' (the default): [0, 1], PyTorch's bilinear resize, 2x - 1, as
        pytorch-fid; 'adm': as the TF graph the ADM evaluator feeds [0, 255] images to, TF1's
        bilinear resize (`resize_bilinear_tf1`) then (x - 128) / 128.
      dtype: compute dtype of the convolutions and batch norms (float32 by default; bfloat16
        changes the features by far more than the 1e-4 parity of float32).
      precision: `jax.lax.Precision` of the convolutions and the classifier. HIGHEST by
        default, so that TPUs and TF32-capable GPUs compute in full float32.
    """

    num_classes: int = NUM_CLASSES
    resize_input: bool = True
    preprocess: str = "pytorch_fid"
    dtype: Any = jnp.float32
    precision: Any = HIGHEST

    def network_input(self, images: jnp.ndarray) -> jnp.ndarray:
        """[0, 255] images (N, H, W, 3) -> the first convolution's input (N, 299, 299, 3) in
        `dtype`, as `preprocess` says."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) RGB images, got shape {images.shape}")
        if self.preprocess == "adm":
            x = images.astype(jnp.float32)  # the graph's ExpandDims:0 input, [0, 255]
            if self.resize_input:
                x = resize_bilinear_tf1(x, (RESOLUTION, RESOLUTION))
            x = ((x - 128.0) * (1.0 / 128.0)).astype(self.dtype)  # its Sub and Mul nodes
        elif self.preprocess == "pytorch_fid":
            x = images.astype(jnp.float32) / 255.0  # pytorch-fid's input range, [0, 1]
            if self.resize_input:
                x = resize_bilinear(x, (RESOLUTION, RESOLUTION))
            x = (2.0 * x - 1.0).astype(self.dtype)
        else:
            raise ValueError(f"preprocess={self.preprocess!r}: expected one of {PREPROCESS}")
        return x

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> dict[str, jnp.ndarray]:
        x = self.network_input(images)

        kw = dict(dtype=self.dtype, precision=self.precision)
        conv = functools.partial(BasicConv2d, **kw)

        # Stem. 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35.
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)

        # 35x35: 192 -> 256 -> 288 -> 288 channels.
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        # 17x17, 768 channels.
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x, _ = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x, _ = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x, mixed_6_conv = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x, _ = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        # 8x8: 1280 -> 2048 -> 2048 channels.
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)

        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
        out = {"pool3": pool3, "spatial": spatial.reshape(spatial.shape[0], -1)}
        if self.num_classes:
            fc = nn.Dense(self.num_classes, precision=self.precision, name="fc")
            out["logits"] = fc(pool3)
            # ADM's Inception Score: the classifier's matmul without its bias (module docstring).
            out["logits_unbiased"] = jnp.dot(
                pool3, fc.variables["params"]["kernel"], precision=self.precision
            )
        return out

"""Explicit FLOP counts (2 per multiply-add; a training step is 3 forwards: the backward costs
two, one for the activations' gradients and one for the weights').

`lightningdit_forward_flops` counts LightningDiT layer by layer from its constructor kwargs;
`matmul_flops` counts the dot / conv equations of any traced JAX function (what the VA-VAE's
convolution stacks, DINOv2 and LPIPS are measured with). Elementwise work (norms, activations,
softmax, RoPE, optimiser) is not counted: XLA's `cost_analysis()` counts it, so the two agree
to within a few per cent on models whose matmuls dominate.
"""

from __future__ import annotations

import math

import jax

from dit_jax.model import swiglu_hidden_size


def lightningdit_forward_flops(model_kwargs: dict, tokens: int | None = None) -> float:
    """FLOPs of one LightningDiT forward pass for one image of `tokens` tokens.

    `model_kwargs` are the `dit_jax.LightningDiT` constructor kwargs (`hidden_size`, `depth`,
    `num_heads`, `patch_size`, `in_channels`, `mlp_ratio`, `use_swiglu`, `learn_sigma`,
    `wo_shift`); `tokens` defaults to (input_size / patch_size)^2. Counted multiply-adds:
      patch embed      tokens * (p*p*C) * D
      t embedder       256 * D + D * D (per image; the label embedder is a table lookup)
      per block        adaLN D * 6D (4D with wo_shift, per image); qkv tokens * D * 3D;
                       scores tokens^2 * D (all heads); values tokens^2 * D; proj tokens * D^2;
                       SwiGLU tokens * 3 * D * H with H = int(2/3 * int(D * mlp_ratio))
                       (plain MLP: tokens * 2 * D * mlp_ratio * D)
      final layer      adaLN D * 2D (per image); linear tokens * D * (p*p*C_out)
    LightningDiT-XL/1 at 16 x 16 tokens: 237.3 GFLOP (B/1: 46.0).
    """
    d = model_kwargs.get("hidden_size", 1152)
    depth = model_kwargs.get("depth", 28)
    p = model_kwargs.get("patch_size", 2)
    c = model_kwargs.get("in_channels", 32)
    mlp_ratio = model_kwargs.get("mlp_ratio", 4.0)
    c_out = 2 * c if model_kwargs.get("learn_sigma", False) else c
    if tokens is None:
        tokens = (model_kwargs.get("input_size", 32) // p) ** 2
    t = tokens

    if model_kwargs.get("use_swiglu", False):
        mlp = 3 * d * swiglu_hidden_size(d, mlp_ratio)
    else:
        mlp = 2 * d * int(d * mlp_ratio)
    n_mod = 4 if model_kwargs.get("wo_shift", False) else 6
    block = (d * n_mod * d  # adaLN modulation (per image)
             + t * d * 3 * d  # qkv
             + t * t * d  # q k^T over all heads
             + t * t * d  # attention-weighted values
             + t * d * d  # output projection
             + t * mlp)  # MLP / SwiGLU
    patch_embed = t * p * p * c * d
    t_embed = 256 * d + d * d
    final = d * 2 * d + t * d * p * p * c_out
    return 2.0 * (patch_embed + t_embed + depth * block + final)


# -- any traced function --------------------------------------------------------------------


def _sub_jaxprs(value):
    """Jaxprs held by an equation parameter (closed or open, alone or in a tuple)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = math.prod(rhs) // max(1, math.prod(rhs[i] for i in (*rhs_contract, *rhs_batch)))
    return 2.0 * math.prod(lhs) * rhs_free


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out ch, in ch, *spatial) positions
    per_output = kernel[rhs_spec[1]] * math.prod(kernel[i] for i in rhs_spec[2:])
    return 2.0 * math.prod(out) * per_output


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params["branches"]))
        else:
            inner = sum(_jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
            total += inner * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def matmul_flops(fn, *args) -> float:
    """2 * multiply-adds of every dot_general and convolution in ``fn(*args)`` (arrays or
    `jax.ShapeDtypeStruct`s; nothing runs). Scans count `length` times, a cond its largest
    branch, a while loop's body once."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)

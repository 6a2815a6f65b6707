"""Forward and one train step on 8 simulated CPU devices equal the single-device result."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dit_jax import LightningDiT
from dit_jax.train_step import init_train_state, loss_fn, make_optimizer, train_step
from launch.sharding import (
    batch_sharding,
    create_mesh,
    mesh_context,
    replicated,
    sharded_init,
)

MODEL = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                     num_heads=4, num_classes=10, use_qknorm=True, use_swiglu=True,
                     use_rope=True, use_rmsnorm=True)
OPTIMIZER = make_optimizer(lr=1e-3)  # = LR
STEP = functools.partial(train_step, model=MODEL, optimizer=OPTIMIZER, ema_decay=0.9)
LR = 1e-3


def _grads(params, batch):
    x0 = jax.random.normal(jax.random.key(5), batch["latents"].shape)
    t = jax.random.uniform(jax.random.key(6), (batch["latents"].shape[0],))
    return jax.grad(lambda p: loss_fn(p, MODEL, batch["latents"], batch["labels"], x0, t)[0])(
        params)


def _batch():
    k1, k2 = jax.random.split(jax.random.key(42))
    return {"latents": jax.random.normal(k1, (16, 8, 8, 4)),
            "labels": jax.random.randint(k2, (16,), 0, 10)}


@functools.cache
def _single_device_reference():
    init = functools.partial(init_train_state, MODEL, OPTIMIZER)
    state = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
    # Move away from the zero init so the forward output is not trivially zero.
    state = state.replace(params=jax.tree.map(lambda p: p + 0.02, state.params))
    batch = _batch()
    out = jax.jit(MODEL.apply)({"params": state.params}, batch["latents"],
                               jnp.linspace(0, 1, 16), batch["labels"])
    grads = jax.jit(_grads)(state.params, batch)
    new_state, metrics = jax.jit(STEP)(state, batch, jax.random.key(1))
    return jax.device_get((out, grads, new_state, metrics))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (2, 2, 2)], ids=["data2_fsdp4", "dp_fsdp_tp"])
def test_sharded_forward_and_step_match_single_device(mesh_shape):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    ref_out, ref_grads, ref_state, ref_metrics = _single_device_reference()
    mesh = create_mesh(mesh_shape)

    init = functools.partial(init_train_state, MODEL, OPTIMIZER)
    state, shardings = sharded_init(init, jax.random.key(0), mesh=mesh)
    with mesh_context(mesh):
        shift = jax.jit(lambda p: jax.tree.map(lambda a: a + 0.02, p),
                        out_shardings=shardings.params)
        state = state.replace(params=shift(state.params))
        # Parameters really are split: FSDP over 'embed', heads over 'tensor'.
        qkv = state.params["blocks_0"]["attn"]["qkv"]["kernel"]  # (64, 3, 4, 16)
        fsdp, tensor = mesh_shape[1], mesh_shape[2]
        assert qkv.addressable_shards[0].data.shape == (64 // fsdp, 3, 4 // tensor, 16)
        mu = state.opt_state[0].mu["blocks_0"]["attn"]["qkv"]["kernel"]
        assert mu.sharding == qkv.sharding  # optimizer state follows its parameter

        batch = jax.device_put(_batch(), {"latents": batch_sharding(mesh, 4),
                                          "labels": batch_sharding(mesh, 1)})
        out = jax.jit(MODEL.apply)({"params": state.params}, batch["latents"],
                                   jnp.linspace(0, 1, 16), batch["labels"])
        grads = jax.jit(_grads, out_shardings=shardings.params)(state.params, batch)
        step = jax.jit(STEP, in_shardings=(shardings, None, replicated(mesh)),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
        new_state, metrics = step(state, batch, jax.random.key(1))

    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    _assert_trees_close(grads, ref_grads, atol=1e-6, rtol=1e-4)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5, err_msg=key)
    # After AdamW a coordinate moves by ~lr * g / (|g| + eps): entries whose gradient is ~1e-8
    # can differ by a fraction of lr through summation order alone, hence atol ~ 0.05 lr.
    _assert_trees_close(new_state, ref_state, atol=0.05 * LR, rtol=1e-5)


def _assert_trees_close(got, want, *, atol, rtol):
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = jax.tree.leaves(got)
    assert len(flat_got) == len(flat_want)
    for (path, w), g in zip(flat_want, flat_got):
        np.testing.assert_allclose(np.asarray(g), w, atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(path))

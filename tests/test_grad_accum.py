"""Gradient accumulation in the LightningDiT train step equals the big-batch step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dit_jax import LightningDiT
from dit_jax.train_step import init_train_state, label_drop_ids, make_optimizer, train_step
from launch.sharding import (
    batch_sharding,
    create_mesh,
    logical_shardings,
    mesh_context,
    replicated,
)

MODEL = LightningDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                     num_heads=4, num_classes=10, class_dropout_prob=0.1)
LR = 1e-3
OPTIMIZER = make_optimizer(lr=LR)
STEP = functools.partial(train_step, model=MODEL, optimizer=OPTIMIZER, ema_decay=0.9)
RNG = jax.random.key(1)
# After AdamW a coordinate moves by ~lr * g / (|g| + eps): where g is tiny, summation order
# alone can move it by a fraction of lr (here up to ~0.004 lr measured).
STATE_ATOL = 0.02 * LR


@functools.cache
def _state():
    state = jax.jit(lambda r: nn.meta.unbox(init_train_state(MODEL, OPTIMIZER, r)))(
        jax.random.key(0))
    # Move away from adaLN-Zero so every parameter gets a gradient and labels matter. Random,
    # not constant: a constant shift leaves the blocks' gradients at float noise (~1e-8).
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    noise = [0.02 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
    return state.replace(params=jax.tree.unflatten(tree, [p + n for p, n in zip(leaves, noise)]))


def _batch(size=8):
    k1, k2 = jax.random.split(jax.random.key(42))
    return {"latents": jax.random.normal(k1, (size, 8, 8, 4)),
            "labels": jax.random.randint(k2, (size,), 0, 10)}


@functools.cache
def _trajectory(accum_steps=None, batch_size=8):
    """(state, metrics) after steps 1 and 3 from `_state()`; None: `train_step`'s default."""
    kw = {} if accum_steps is None else {"accum_steps": accum_steps}
    step = jax.jit(functools.partial(STEP, **kw))
    state, batch, out = _state(), _batch(batch_size), {}
    for i in range(1, 4):
        state, metrics = step(state, batch, RNG)
        out[i] = (state, metrics)
    return jax.device_get((out[1], out[3]))


def _max_errors(got, want):
    """Largest absolute and relative difference over all leaves of two trees."""
    abs_err = rel_err = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        diff = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        abs_err = max(abs_err, float(diff.max()))
        rel_err = max(rel_err, float((diff / np.maximum(np.abs(w), 1e-6)).max()))
    return abs_err, rel_err


def _assert_steps_match(got, want, label):
    (state, metrics), (ref_state, ref_metrics) = got, want
    assert int(state.step) == int(ref_state.step)
    for name in ("params", "ema_params", "opt_state"):
        err = _max_errors(getattr(state, name), getattr(ref_state, name))
        print(f"{label} {name}: max abs {err[0]:.2e}, max rel {err[1]:.2e}")
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=STATE_ATOL, rtol=1e-5),
                     getattr(state, name), getattr(ref_state, name))
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        err = abs(float(metrics[key]) - float(ref_metrics[key]))
        print(f"{label} metric {key}: {float(ref_metrics[key]):.6f}, abs err {err:.2e}")
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)


def _drop_ids_per_step(num_steps, labels):
    """The label-dropout decisions of each step: the same keys as `train_step`."""
    keys = [jax.random.split(jax.random.fold_in(RNG, s), 3)[2] for s in range(num_steps)]
    return np.stack([label_drop_ids(MODEL, labels, k) for k in keys])


def test_label_drop_ids_match_the_models_own_dropout():
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)
    key = jax.random.key(3)
    drop = label_drop_ids(MODEL, y, key)
    assert 0 < int(drop.sum()) < 64

    def embed(module, labels, **kw):  # the label embedding inside `LightningDiT.__call__`
        return module.y_embedder(labels, True, **kw)

    apply = functools.partial(MODEL.apply, {"params": _state().params}, y, method=embed)
    inside = apply(rngs={"label_dropout": key})
    np.testing.assert_array_equal(inside, apply(force_drop_ids=drop))
    assert not np.allclose(inside, apply(force_drop_ids=jnp.zeros_like(drop)))


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_steps_match_big_batch(accum_steps):
    # The comparison only covers label dropout if some label is actually dropped.
    assert _drop_ids_per_step(3, _batch()["labels"]).any()
    for num_steps, got, want in zip((1, 3), _trajectory(accum_steps), _trajectory()):
        _assert_steps_match(got, want, f"k={accum_steps} steps={num_steps}")


def test_accum_steps_1_is_the_default_bit_for_bit():
    # The same program (jaxpr) as before accumulation existed, hence the same bits; cheaper
    # than compiling both.
    args = (_state(), _batch(), RNG)
    assert str(jax.make_jaxpr(STEP)(*args)) == str(
        jax.make_jaxpr(functools.partial(STEP, accum_steps=1))(*args))


@pytest.mark.parametrize("accum_steps", [3, 0])
def test_accum_steps_must_divide_the_batch(accum_steps):
    with pytest.raises(ValueError, match="must be >= 1 and divide the batch size 8"):
        STEP(_state(), _batch(), RNG, accum_steps=accum_steps)


def test_accumulated_step_on_sharded_batch_matches_big_batch():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    batch = _batch(16)  # micro-batches of 8: one sample per device
    want = _trajectory(None, 16)[0]

    mesh = create_mesh((8, 1, 1))
    init = functools.partial(init_train_state, MODEL, OPTIMIZER)
    shardings = logical_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    with mesh_context(mesh):
        state = jax.device_put(_state(), shardings)
        batch = jax.device_put(batch, {"latents": batch_sharding(mesh, 4),
                                       "labels": batch_sharding(mesh, 1)})
        assert batch["latents"].addressable_shards[0].data.shape == (2, 8, 8, 4)
        step = jax.jit(functools.partial(STEP, accum_steps=2),
                       in_shardings=(shardings, None, replicated(mesh)),
                       out_shardings=(shardings, replicated(mesh)))
        got = jax.device_get(step(state, batch, RNG))
    _assert_steps_match(got, want, "sharded k=2")

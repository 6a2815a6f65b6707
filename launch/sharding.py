"""Device mesh and logical-axis sharding rules.

Models annotate parameters with *logical* axis names (`nn.with_logical_partitioning`) and
activations with `nn.with_logical_constraint`; this module maps those names onto a
``('data', 'fsdp', 'tensor')`` mesh. The vocabulary:

parameters                                activations
  embed     transformer width               act_batch     batch
  mlp       MLP hidden width                act_len       token axis
  heads     attention heads                 act_embed     transformer width
  kv        per-head width                  act_heads     attention heads
  classes   label-embedding rows            act_mlp       MLP hidden width
  conv_in   conv input channels             act_height / act_width / act_channels
  conv_out  conv output channels
  norm      norm scales / biases (1-D)

Parameters are sharded FSDP-style along their width axis ('embed', 'conv_out') and
tensor-parallel along heads / MLP width; the batch is split over data and fsdp together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("classes", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
)


def create_mesh(shape: Sequence[int] | dict[str, int], devices=None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh; one entry of `shape` may be -1 (fill the rest).

    On TPUs and GPUs the devices are laid out by `mesh_utils` so neighbouring mesh positions
    are neighbours on the interconnect; a `dcn_data` entry (> 1) splits the data axis across
    slices / hosts joined by the data-center network (multi-slice TPU, multi-node GPU).
    Uses `jax.sharding.Mesh` (Auto axis types): Linen's logical partitioning does not work with
    the Explicit axes that `jax.make_mesh` defaults to.
    """
    dcn_data = 1
    if isinstance(shape, dict):
        shape = dict(shape)
        dcn_data = int(shape.pop("dcn_data", 1) or 1)
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
        shape = [shape.get(a, 1) for a in MESH_AXES]
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if n % known:
            raise ValueError(f"mesh shape {shape} does not divide {n} devices")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {n}")
    if shape[0] % dcn_data:
        raise ValueError(f"mesh.dcn_data={dcn_data} does not divide the data axis {shape[0]}")
    return Mesh(device_grid(shape, devices, dcn_data), MESH_AXES)


def device_grid(shape: list[int], devices: list, dcn_data: int = 1) -> np.ndarray:
    """Devices arranged as `shape`: interconnect-aware on accelerators, in order on CPU."""
    from jax.experimental import mesh_utils

    if devices[0].platform == "cpu" or len(devices) == 1:
        return np.asarray(devices).reshape(shape)
    if dcn_data > 1:
        ici = [shape[0] // dcn_data, *shape[1:]]
        return mesh_utils.create_hybrid_device_mesh(ici, [dcn_data, 1, 1], devices,
                                                    allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def _divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicate the dimensions that the assigned mesh axes do not divide evenly (e.g. the
    3 output channels of an RGB conv on a 4-way fsdp axis)."""
    entries = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        entries.append(axes if dim % size == 0 else None)
    return PartitionSpec(*entries)


def logical_shardings(abstract_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree that may hold `nn.Partitioned` boxes (from `jax.eval_shape`).

    Leaves without logical names are replicated, and so is any dimension its mesh axes do not
    divide. The result has the *unboxed* tree structure.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_tree), list(rules))
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _divisible(spec, np.shape(leaf), mesh)),
        specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input batch: leading axis over ('data', 'fsdp'), the rest replicated."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), list(rules))
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES):
    """Activate `mesh` and the logical rules; jit and trace sharded code inside it.

    `jax.set_mesh` (not the deprecated ``with mesh:``) is what makes Flax's
    `nn.with_logical_constraint` take effect.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


def sharded_init(init_fn, *args, mesh: Mesh, rules=DEFAULT_RULES):
    """Create a state that is born sharded.

    `init_fn(*args)` returns a pytree whose parameters carry `nn.Partitioned` boxes. Its shapes
    and logical names are read under `jax.eval_shape` (nothing allocated), then the jitted init
    writes every leaf straight into its shard. Returns ``(unboxed_state, shardings)``.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    with mesh_context(mesh, rules):
        state = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return state, shardings

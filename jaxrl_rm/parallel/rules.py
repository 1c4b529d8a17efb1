"""The one table that says how weights and batches are sharded.

Two steps, both declared here and nowhere else:
1. `PARAM_LOGICAL_AXES`: parameter path pattern -> logical axis name per dimension. A weight of
   a scanned layer stack (`.../layers/<name>/...`, not `.../layers/<i>/...`; see
   `models.transformer`) has a leading `"layers"` axis before the axes its pattern names.
2. `LOGICAL_TO_MESH`: logical axis name -> mesh axes.
A dimension that a mesh axis does not divide is replicated (tiny test models, odd vocabularies),
so the same code runs on 1 CPU device, 8 fake devices, a GPU node or a TPU pod.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Parameter path (joined with "/") -> logical axes of its dimensions. First match wins.
PARAM_LOGICAL_AXES: list[tuple[str, tuple]] = [
    (r"(^|/)embed$", ("vocab", "embed")),
    (r"attn/(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"attn/(q_proj|k_proj|v_proj)/bias$", ("heads",)),
    (r"attn/o_proj/kernel$", ("heads", "embed")),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(^|/)score$", ("embed",)),
    (r"(scale|bias)$", (None,)),
]

# A parameter of a scanned layer stack: `layers/` followed by a name, not a layer index.
STACKED_LAYERS = re.compile(r"(^|/)layers/(?!\d+(/|$))")

# Logical axis -> mesh axes (None = replicated).
LOGICAL_TO_MESH: dict[str | None, tuple | str | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,  # the layer dim of stacked weights: every chip holds every layer's shard
    None: None,
}


def logical_axes_for(path: str, ndim: int) -> tuple:
    if STACKED_LAYERS.search(path):
        return ("layers",) + _table_axes(path, ndim - 1)
    return _table_axes(path, ndim)


def _table_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} has {len(axes)} axes but {path} has {ndim} dims")
            return axes
    raise ValueError(f"no sharding rule for parameter {path!r}; add one to jaxrl_rm/parallel/rules.py")


def _mesh_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def spec_for(shape: tuple, logical: tuple, mesh: Mesh) -> P:
    """PartitionSpec for an array of `shape` with logical axes; non-divisible dims replicate."""
    parts = []
    for dim, name in zip(shape, logical):
        axes = LOGICAL_TO_MESH[name]
        size = _mesh_size(mesh, axes)
        parts.append(axes if size > 1 and dim % size == 0 else None)
    return P(*parts)


def _path_str(path) -> str:
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        keys.append(str(key))
    return "/".join(keys)


def param_shardings(params, mesh: Mesh):
    """Pytree of `NamedSharding` for a parameter pytree (NNX state or pure dict)."""

    def one(path, x):
        p = _path_str(path)
        if p.endswith("/value"):  # nnx.Variable leaves flatten to .../value in some versions
            p = p[: -len("/value")]
        return NamedSharding(mesh, spec_for(x.shape, logical_axes_for(p, len(x.shape)), mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def strided_row_blocks(tree, blocks: int):
    """Arrays `[B, ...]` -> `[blocks, B / blocks, ...]`, block j holding rows j, j + blocks, ...

    Batches are sharded in contiguous row blocks over (data, fsdp), so a strided split keeps
    every chip's own rows in every block (a contiguous split would put each block on a few chips
    and all-gather it to the rest). `merge_row_blocks` is the inverse."""
    def split(x):
        if x.shape[0] % blocks:
            raise ValueError(f"{x.shape[0]} rows do not split into {blocks} blocks")
        return jnp.swapaxes(x.reshape(x.shape[0] // blocks, blocks, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def merge_row_blocks(tree):
    """Inverse of `strided_row_blocks`: `[blocks, B / blocks, ...]` -> `[B, ...]`."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def batch_shards(mesh: Mesh) -> int:
    """How many shards a batch's rows are split into: the (data, fsdp) size of `mesh`."""
    return int(np.prod([mesh.shape.get(a, 1) for a in LOGICAL_TO_MESH["batch"]]))


def kv_head_axis(mesh: Mesh, num_kv_heads: int) -> str | None:
    """The mesh axis a KV cache's head dimension is split over: "tensor" when it is > 1 and
    divides `num_kv_heads`, else None (the heads are replicated)."""
    tensor = mesh.shape.get("tensor", 1)
    return "tensor" if tensor > 1 and num_kv_heads % tensor == 0 else None


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays `[B, ...]`: leading dim over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_TO_MESH["batch"], *([None] * (ndim - 1))))


@functools.partial(jax.jit, static_argnames=("mesh",))
def take_rows(batch, idx, mesh: Mesh):
    """Rows `idx` (`[n]` int, the same on every process) of a device batch (dict of `[B, ...]`
    arrays), placed like `shard_batch`'s: rows over (data, fsdp). Indexing a sharded array
    leaves the result's placement to XLA, which may replicate it on every device."""
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x[idx], batch_sharding(mesh, x.ndim)), batch)


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (dict of numpy arrays, leading dim = global batch) on the mesh.

    Single-process: `device_put`. Multi-process: each process passes its local rows and the
    global array is assembled with `jax.make_array_from_process_local_data`.
    """

    def put(x):
        sharding = batch_sharding(mesh, np.ndim(x))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)

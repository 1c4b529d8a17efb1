"""Device mesh from config, and multi-host start-up.

Axes: `data` (pure data parallel), `fsdp` (batch *and* weights/optimizer state sharded),
`tensor` (heads, MLP hidden and vocab sharded). The mesh uses `AxisType.Auto` on purpose:
jax 0.10's `jax.make_mesh` defaults to Explicit axes, which would make every jnp op in the model
sharding-typed; with Auto, `jit` + `NamedSharding` on inputs propagate through the model and
`shard_map` is used where manual control pays (vocab-parallel log-probs).
"""

from __future__ import annotations

import os

import jax
from jax.sharding import AxisType, Mesh

from jaxrl_rm.configlib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (= the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {unknown}")
    known = 1
    for k, v in sizes.items():
        if v != -1:
            known *= v
    if unknown:
        if len(devices) % known:
            raise ConfigError(f"mesh.{unknown[0]}: {len(devices)} devices are not divisible by the "
                              f"other axes' product {known}")
        sizes[unknown[0]] = len(devices) // known
    total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if total != len(devices):
        raise ConfigError(f"mesh: data*fsdp*tensor = {total} but {len(devices)} devices are available "
                          f"(mesh.data={sizes['data']}, mesh.fsdp={sizes['fsdp']}, mesh.tensor={sizes['tensor']})")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(cfg) -> Mesh:
    """`cfg` is a `MeshConfig`."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)


def maybe_initialize_distributed(cfg) -> bool:
    """Call `jax.distributed.initialize` when configured.

    `auto` initialises only when a coordinator is named (`cfg.coordinator_address` or env
    JAX_COORDINATOR_ADDRESS, as `launch/slurm_gpu.sh` exports; process count and id from the
    config or JAX_NUM_PROCESSES / JAX_PROCESS_ID). `true` always initialises, leaving what is not
    given to jax's own cluster detection (TPU pod slices, SLURM, ...; `launch/tpu_vm.sh run`
    passes it). `false` never does.

    `cfg` is a `DistributedConfig`. Returns True when multi-process JAX was initialised.
    """
    mode = cfg.initialize
    env_coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if mode == "false" or (mode == "auto" and not (cfg.coordinator_address or env_coordinator)):
        return False
    kwargs = {}
    if cfg.coordinator_address or env_coordinator:
        kwargs["coordinator_address"] = cfg.coordinator_address or env_coordinator
    num = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if num:
        kwargs["num_processes"] = num
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)
    return True


def spans_processes(mesh: Mesh | None) -> bool:
    """True when `mesh` holds devices of more than one process (multi-host)."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def replicate(tree, mesh: Mesh | None):
    """Make every array in `tree` fully replicated over `mesh` when the mesh spans several
    processes, so that any process can read it (`np.asarray`) — e.g. sampler outputs whose rows
    are sharded over hosts. A no-op on a single-process mesh. Collective: every process calls it.
    """
    if not spans_processes(mesh):
        return tree
    from jax.sharding import NamedSharding, PartitionSpec

    out = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.jit(lambda a: a, out_shardings=out)(x) if isinstance(x, jax.Array) else x,
                        tree)


def fetch_global(tree):
    """Numpy copies of the *global* values of `tree`'s arrays, on every process (params for an
    HF export, say). Arrays spread over other processes are all-gathered to host memory
    (`multihost_utils.process_allgather`), so this is collective when any is; others are copied.
    """
    import numpy as np
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree.map(one, tree)


def process_sum(value):
    """Sum of a host-side number over all processes (e.g. tokens in each host's rows of a
    global batch). Collective when there are several processes; the number itself otherwise."""
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return type(value)(np.sum(multihost_utils.process_allgather(np.asarray(value))))

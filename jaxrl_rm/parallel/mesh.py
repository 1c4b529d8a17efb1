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
    """Call `jax.distributed.initialize` when configured (or, with `auto`, when the environment
    names a coordinator: JAX_COORDINATOR_ADDRESS, or a TPU pod / SLURM job that jax detects).

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

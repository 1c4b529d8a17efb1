"""Compile for accelerators this machine does not have: TPU topologies (libtpu, ahead of time)
and CUDA lowering.

Why: the kernels and shardings exist for TPU pods and GPU nodes, and a CPU test cannot show
that a Mosaic kernel compiles, how much HBM a step needs per chip, or which collectives XLA
inserts. libtpu (`pip install -e ".[tpu-aot]"`, i.e. `jax[tpu]` of the installed jax) carries
the real XLA TPU compiler, Mosaic included; with `JAX_PLATFORMS=cpu`,
`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices to build a `Mesh`
from, and `jax.jit(f).lower(ShapeDtypeStructs).compile()` compiles exactly as on a TPU VM —
nothing is allocated and nothing runs. `compile_report` reads back per-chip memory and the
collectives of the compiled HLO. For CUDA only lowering is possible without a GPU
(`lower_for_cuda`): it runs Pallas' GPU lowering rules, not the Triton / PTX compiler.

Used by tests/test_tpu_aot.py, `benchmarks/logprob.py --tpu-aot` and the planner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import re
import time
from collections import Counter

import jax
import numpy as np

GIB = 2**30
# HBM per chip, by generation (the first part of a topology name such as "v5e:2x4").
TPU_HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def tpu_aot_available() -> bool:
    """True when libtpu (the TPU compiler) is installed."""
    return importlib.util.find_spec("libtpu") is not None


@functools.lru_cache(maxsize=None)
def tpu_devices(topology: str) -> tuple:
    """The abstract devices of a TPU `topology` (e.g. "v5e:2x4", "v5p:2x2x1", "v6e:2x2").

    Needs libtpu. libtpu admits one process per machine through a lock file; an AOT compile
    holds no chip, so several compiling processes (parallel tests, a benchmark beside them) are
    allowed (`ALLOW_MULTIPLE_LIBTPU_LOAD`).
    """
    if not tpu_aot_available():
        raise RuntimeError(f"compiling for TPU topology {topology!r} needs libtpu: "
                           'pip install -e ".[tpu-aot]" (jax[tpu] of the installed jax)')
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def tpu_generation(topology: str) -> str:
    """"v5e:2x4" -> "v5e"."""
    return topology.split(":")[0].lower()


def tpu_mesh(topology: str, shape: tuple[int, int, int] | None = None) -> jax.sharding.Mesh:
    """A `(data, fsdp, tensor)` mesh over the first `prod(shape)` chips of `topology` (all
    chips on `data` by default)."""
    devs = tpu_devices(topology)
    shape = shape or (len(devs), 1, 1)
    n = int(np.prod(shape))
    if n > len(devs):
        raise ValueError(f"mesh {shape} needs {n} chips; topology {topology} has {len(devs)}")
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return jax.sharding.Mesh(np.array(devs[:n]).reshape(shape), ("data", "fsdp", "tensor"),
                             axis_types=axis_types)


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What the compiler says about one jitted function, per chip.

    temp_bytes: XLA's temporary buffers (activations, scratch; the working memory);
    argument_bytes / output_bytes: this chip's shards of the inputs / outputs; alias_bytes: the
      outputs written in place of donated inputs (counted in both);
    collectives: op name -> count in the compiled HLO (async `-start` forms counted as the op);
    all_gather_shapes: the result shape of every all-gather (to tell a weight gather from an
      activation gather); compile_seconds: lowering + compilation wall time.
    """

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    compile_seconds: float
    collectives: dict
    all_gather_shapes: tuple

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs (donated ones once) + temporaries: the chip's live HBM for the call."""
        return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes


_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _collectives(hlo: str) -> tuple[dict, tuple]:
    counts: Counter = Counter()
    gathers = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        counts[m.group(2)] += 1
        if m.group(2) == "all-gather":
            shapes = _SHAPE.findall(m.group(1))  # "-start" results are (operand, result) tuples
            if shapes:
                gathers.append(tuple(int(x) for x in shapes[-1].split(",") if x))
    return dict(counts), tuple(gathers)


def compile_report(fn, *args, **kwargs) -> CompileReport:
    """Lower and compile `fn` (jitted here unless it already is) for the shardings / devices of
    its `jax.ShapeDtypeStruct` arguments; nothing is allocated."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    counts, gathers = _collectives(compiled.as_text())
    return CompileReport(temp_bytes=int(mem.temp_size_in_bytes),
                         argument_bytes=int(mem.argument_size_in_bytes),
                         output_bytes=int(mem.output_size_in_bytes),
                         alias_bytes=int(mem.alias_size_in_bytes),
                         generated_code_bytes=int(mem.generated_code_size_in_bytes),
                         compile_seconds=seconds, collectives=counts, all_gather_shapes=gathers)


# The GPU `lower_for_cuda` targets when this process has none: the Hopper chips the kernels are
# written for (the H100 and H200 are one target, sm_90).
CUDA_TARGET = "NVIDIA H100"


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """StableHLO text of `fn` lowered for CUDA (no GPU needed; Pallas GPU kernels run their
    lowering rules). Arguments are concrete or `jax.ShapeDtypeStruct`s without shardings.

    From jax 0.11 Pallas' Triton lowering asks which GPU it lowers for (its compute capability)
    and, on a machine without one, reads it from the abstract mesh's device; without that it
    raises "No supported GPU devices found". So tracing and lowering run under an abstract
    one-device mesh of a `CUDA_TARGET` GPU (jax 0.10's lowering does not read it; tested on
    0.10.2 and 0.11.2). On a machine with a GPU the call lowers for that GPU as is."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    with _cuda_target():
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


@contextlib.contextmanager
def _cuda_target():
    if jax.default_backend() == "gpu":
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=CUDA_TARGET, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("cuda_target",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def token_logprobs_report(mesh: jax.sharding.Mesh, *, n: int, d: int, v: int, dtype="bfloat16",
                          head_dtype=None, impl: str = "chunked", backward: bool = True,
                          with_entropy: bool = False, temperature: float = 1.0,
                          sharded: bool = True, head_spec=None) -> CompileReport:
    """Compile `token_logprobs` (forward, or `value_and_grad` w.r.t. hidden and head) for `mesh`.

    Tokens `[n, d]` are sharded over `(data, fsdp)`; the head `[d, v]` per `head_spec` (default:
    the parameter rules' `("fsdp", "tensor")` where the axes divide). `sharded=False` calls
    `token_logprobs` without the mesh (XLA's partitioner alone), the layout before trainers passed
    their mesh. Pallas kernels compile for the mesh's platform (Mosaic on TPU), never interpreted.
    `impl` is explicit: "auto" would resolve by this process's backend (the CPU), not the target.
    """
    if impl not in ("reference", "chunked", "pallas"):
        raise ValueError(f"impl={impl!r}; name the implementation to compile (reference, chunked, pallas)")
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl_rm.kernels import token_logprobs

    tok = ("data", "fsdp")
    if head_spec is None:
        head_spec = P("fsdp" if d % mesh.shape["fsdp"] == 0 else None,
                      "tensor" if v % mesh.shape["tensor"] == 0 else None)
    h = jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype), sharding=NamedSharding(mesh, P(tok, None)))
    w = jax.ShapeDtypeStruct((d, v), jnp.dtype(head_dtype or dtype), sharding=NamedSharding(mesh, head_spec))
    t = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P(tok)))
    platform = mesh.devices.flat[0].platform
    kw = dict(impl=impl, temperature=temperature, with_entropy=with_entropy,
              mesh=mesh if sharded else None)
    if impl == "pallas":
        kw.update(pallas_platform="gpu" if platform in ("gpu", "cuda") else "tpu", interpret=False)

    def loss(h, w, t):
        out = token_logprobs(h, w, t, **kw)
        return sum(jnp.sum(x) for x in out) if with_entropy else jnp.sum(out)

    fn = jax.value_and_grad(loss, argnums=(0, 1)) if backward else loss
    return compile_report(fn, h, w, t)

"""Pallas TPU (Mosaic) kernels for token log-probs: one forward kernel (statistics) and one fused
backward kernel that produces `d_hidden` and `d_lm_head` from a single logits recompute. On a CPU
they run in interpret mode (the tests); `tests/test_tpu_aot.py` and `benchmarks/logprob.py
--tpu-aot` compile them for real TPUs (v5e, v5p, v6e) with libtpu on a CPU host.

Why kernels: the chunked XLA loop round-trips every `[block_tokens, block_vocab]` block of
logits through HBM several times (logits, exp, dz); a kernel keeps the block in VMEM, feeds the
MXU from VMEM and only writes per-token statistics (forward) or gradient tiles (backward).

What RL needs beyond a cross-entropy kernel (tokamax / Levanter: per-example loss and lse):
per-token `z_target` and `lse` (log-probs of the policy, old policy and reference), the entropy
(a third online statistic, `_math.online_update`), temperature (logits scaled by `1/T` in the
kernel), and arbitrary per-token cotangents: the backward takes `dz = a [col == target] +
p (b + c y)` (`_math.logit_grad`), which covers log-prob, lse and entropy gradients of any loss.

Notation: `N` tokens, `D` hidden, `V` vocab; blocks `bn`, `bv`, `bd`; grid sizes
`gi = cdiv(N, bn)`, `gj = cdiv(V, bv)`, `gk = D / bd` (`gk = 1`: D not tiled).

Forward, grid `(gi, gj, gk)`, semantics ("parallel", "arbitrary", "arbitrary"): the logits
block `h[i, k] @ W[k, j]` is accumulated over `k` in float32 VMEM; at the last `k` it is folded,
by row chunks, into the online max / sum-exp / entropy statistics and the target logit
(`(bn, 1)` float32 scratch), written once per token block.

Backward, grid `(cores, gj / cores, gi, stages, gk)`, vocab outside tokens, all but the first
axis "arbitrary":

* stage 0 (only when `gk > 1`): `z = sum_k h[i, k] @ W[k, j]` into float32 VMEM;
* last stage, `k == 0`: `dz` of the `(i, j)` block into VMEM (input dtype: bf16 on the MXU);
* last stage, each `k`: `d_lm_head[k, j] += hidden^T[k, i] @ dz` into a float32 `[D, bv]` VMEM
  accumulator (its reduction axis, tokens, runs inside the vocab axis, so it is written to the
  output once per `(k, j)`), and `d_hidden[i, k] += dz @ W[k, j]^T`, read-modify-written in a
  float32 `[N, D]` accumulator in HBM by manual DMA through two VMEM slots (the write of one
  step overlaps the next; the race-free ordering is checked by the TPU interpreter's race
  detector in the tests).

Why this order, and the one full-size temporary: one gradient's reduction axis must be outside
the other's, so its partial sums live outside VMEM between visits (a Pallas TPU output block can
only accumulate over consecutive grid steps). Vocab outside puts them on `d_hidden`: a float32
`[N, D]` buffer (56 MiB at N 4096, D 3584; it is the output itself for float32 hidden states) --
the same accumulator the chunked XLA path keeps. Tokens outside would need a float32 `[D, V]` one
(2.0 GiB at D 3584, V 152064); a bf16 accumulator would round the gradient at every vocab block.
tokamax / Levanter keep both gradients as float32 HBM arrays (`[B, H]` and `[cores, H, V]`).
On a megacore chip (v5p) each TensorCore takes half of the vocab blocks and its own `[N, D]`
partial, summed by XLA, so the second core works; `bv` is nudged so the blocks split evenly.
Compiled fwd+bwd temp stays within the chunked path's + 64 MiB (see the table below). The two
backward kernels this replaces needed no full-size temporary (each accumulated in VMEM: d_hidden
over vocab blocks, d_lm_head over token blocks) but recomputed the logits twice: that trade
(10 -> 8 NDV for the f32 `[N, D]` buffer) is the one made here.

FLOPs (2 per multiply-add; matmuls per grid step x grid steps) in units of N D V, also
`FLOPS_PER_NDV`:

* forward: one `[bn, bd] @ [bd, bv]` per step, `gi gj gk` steps: 2 NDV;
* backward: logits `[bn, bd] @ [bd, bv]` (stage 0, `gi gj gk` steps), `[bd, bn] @ [bn, bv]`
  and `[bn, bv] @ [bv, bd]^T` (last stage, `gi gj gk` steps): 6 NDV;
* forward + backward: 8 NDV (the two backward kernels this replaces each recomputed the
  logits: 10 NDV). Ragged last blocks add padded work only.

Blocks per TPU generation (`chip_for`, `plan_forward`, `plan_backward`): the chip comes from
`pltpu.get_tpu_info()` (a TPU runtime, or tracing under `jax.set_mesh` of TPU devices), else from
the abstract device of the operands' sharding mesh (an AOT compile on a CPU host with
`ShapeDtypeStruct`s sharded over `jax.experimental.topologies` devices carries it), else
`DEFAULT_CHIP` (64 MiB VMEM, one core: the smallest of v5e/v6e's 128 MiB and v5p/v7x's 64 MiB, so
it compiles everywhere and is only slower on 128 MiB chips). The planner enumerates `bn` in
{256, 512, 1024}, `bv` in {256, ..., 2048}, `bd` in {D} and the multiples of 128 dividing D up
to 1024, keeps `bn * bv <= 1M` (Mosaic unrolls per vector register: compile time grows with the
block) and the VMEM estimate within 3/4 of the chip's, and takes the smallest blocks within 3%
of the fastest `max(FLOPs / peak, HBM bytes / (0.7 bandwidth)) + 0.35 us per step`, with the
chip's own peak and bandwidth. D is tiled when whole-D tiles do not fit or cost more: VMEM use
is then independent of D except for the `[D, bv]` float32 `d_lm_head` accumulator. The backward
is memory-bound on v6e by the model (920 TFLOP/s against 1.6 TB/s: the `[N, D]` accumulator's
8 bytes per (token, hidden) per vocab block); bigger `bv` is the lever and needs VMEM.
VMEM limit: the estimate x 1.5 + 8 MiB, clamped to 7/8 of the chip's capacity (v5p: 64 MiB).

Other choices, each because of the hardware:

* Elementwise work (online statistics, dz) runs in a `fori_loop` over row chunks of ~128K
  elements (`ROW_CHUNK_ELEMS`): Mosaic code size, compile time and float32 temporaries follow
  the chunk, not the block.
* Lane-dense per-token data: the forward writes one `(bn, 128)` float32 block with lse /
  z_target / entropy in lanes 0 / 1 / 2 (one unmasked store and one DMA instead of three
  `(bn, 1)` blocks, each of which fills the same 128-lane HBM tiles with one useful lane); the
  backward reads one `(bn, 128)` block holding target (bit-cast) / lse / a / b / c per step
  instead of five. (Rank-1 blocks would need `get_tpu_info()` while lowering, which an AOT
  compile without a mesh context cannot give.)
* Ragged edges: the last blocks read out of bounds (unspecified values, NaN in interpret mode).
  Only the last vocab block masks columns (`where`, never a multiply) and zeroes the head tile's
  padded columns in VMEM, and only the last token block masks rows (`pl.when` on the block
  index); the forward's out-of-bounds rows are dropped on write. `hidden^T` and the backward's
  per-token block are zero-padded to `gi * bn` rows (they are built by XLA anyway).
* No transposed-LHS dot: `d_lm_head` uses `hidden^T` (`[D, N]`, one XLA transpose, `N D` bytes)
  in a plain `[bd, bn] @ [bn, bv]` product; `d_hidden` is `dz @ W^T`, a transposed RHS, which the
  MXU loads natively. The head itself is never copied, padded, transposed or cast by this
  module. (With V not a multiple of 128, e.g. 50257, XLA picks a column-major entry layout for
  the head and its gradient in an AOT compile and copies each from / to the row-major one the
  kernel takes: 295 MiB of temp at D 1536 on v5e, 2 x the head, against 0 at V 50304; every
  vocabulary of the issue's matrix is a multiple of 128.)
* Matmuls take the input dtype (bf16 on the MXU; float32 at `Precision.HIGHEST`) with float32
  accumulation; statistics and both gradient accumulators are float32; gradients are written
  in the inputs' dtypes.

Measured (AOT `jax.jit(value_and_grad).lower().compile()` with libtpu 0.0.42 on a CPU host,
jax 0.10.2, N 4096 x D 3584 x V 152064 bf16; temp = XLA temporary HBM per chip, "prev" = the
two-kernel backward this replaced; compile seconds on a shared 2-core CPU, only roughly
comparable):

    chip  (bn, bv, bd) fwd / bwd          temp MiB: prev / this / chunked  compile s: same
    v5e   1024,1024,896 / 1024,1024,896   0.0 / 56.3 / 70.7                 4.2 / 11.6 / 31.6
    v5p   512,512,3584 / 512,896,512 x2   4.1 / 112.2 / 134.7               4.6 / 6.1 / 14.1
    v6e   1024,1024,3584 / 256,1024,3584  0.0 / 56.2 / 70.8                 4.6 / 15.7 / 53.7

Over the issue's matrix (v5e, v5p, v6e x D 896..8192 x V 32000 / 128256 / 151936 x bf16 / f32,
entropy and T = 0.7) the fwd+bwd compiles at every point (4-34 s), with temp at most `4 N D`
bytes + 1 MiB per TensorCore (the float32 `[N, D]` accumulator's size; 0 where XLA keeps
everything out of HBM temp, 128 MiB at D 8192 on one core, 256 MiB on v5p's two).
`tests/test_tpu_aot.py` and `benchmarks/logprob.py --tpu-aot` compare it with the chunked
path's: within + 64 MiB, and below it at every point compared with D >= 3584.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxrl_rm.kernels._math import (
    NEG,
    finalize,
    logit_grad,
    matmul_precision,
    online_update,
    out_struct,
)

# Matmul FLOPs in units of N*D*V, counted from the kernels' structure (see the docstring).
FLOPS_PER_NDV = {"forward": 2, "backward": 6}
LANES = 128
MiB = 2**20
_NN = (((1,), (0,)), ((), ()))  # a [m, k] . b [k, n] -> [m, n]
_NT = (((1,), (1,)), ((), ()))  # a [m, k] . b [n, k] -> [m, n] (transposed RHS: native on MXU)
# Elementwise work on a [bn, bv] block runs over row chunks of about this many elements:
# Mosaic unrolls vector code per (8, 128) register, so code size and compile time scale with
# the chunk, not the block, and the float32 temporaries stay a fraction of a MiB.
ROW_CHUNK_ELEMS = 128 * 1024
# Largest logits block: the matmuls, the head-tile zeroing and the accumulator updates are
# unrolled per register too; on v6e a [1024, 2048] backward block takes 13 s to compile, a
# [1024, 1024] one 5.5 s, for a modelled 10% (memory-bound) difference.
MAX_BLOCK_ELEMS = 1024 * 1024
_STEP_SECONDS = 0.35e-6  # fixed cost of one grid step (pipeline bookkeeping, DMA issue)
# Fraction of peak HBM bandwidth the model assumes the block DMAs reach: below 1 so that the
# planner keeps a margin from the compute / memory knee instead of sitting on it.
_HBM_EFFICIENCY = 0.7

# Device kinds (as `jax.Device.device_kind` spells them) -> `pltpu.ChipVersion` member names.
_CHIP_VERSIONS = {
    "TPU v4": "TPU_V4", "TPU v4 lite": "TPU_V4I",
    "TPU v5 lite": "TPU_V5E", "TPU v5e": "TPU_V5E", "TPU v5": "TPU_V5P", "TPU v5p": "TPU_V5P",
    "TPU v6 lite": "TPU_V6E", "TPU v6e": "TPU_V6E", "TPU7": "TPU_7", "TPU7x": "TPU_7X",
}


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the block planner needs to know about one TPU (per JAX device; per-TensorCore
    figures as `pltpu.TpuInfo` gives them)."""

    vmem_bytes: int  # VMEM per TensorCore
    cores: int  # TensorCores per JAX device (2 on a megacore v4 / v5p)
    flops: float  # bf16 FLOP/s per TensorCore
    hbm_bw: float  # HBM bytes/s per TensorCore
    name: str = "unknown"


# Without a device to ask (interpret mode, an AOT compile without a mesh): the smallest VMEM of
# the TPUs this library targets (v5p, v7x: 64 MiB; v5e, v6e: 128 MiB), one core, v5e speeds.
DEFAULT_CHIP = Chip(vmem_bytes=64 * MiB, cores=1, flops=197e12, hbm_bw=820e9, name="default")


def _chip_from_info(info) -> Chip:
    return Chip(vmem_bytes=int(info.vmem_capacity_bytes), cores=max(1, int(info.num_cores)),
                flops=float(info.bf16_ops_per_second), hbm_bw=float(info.mem_bw_bytes_per_second),
                name=str(info.chip_version))


def chip_for(x=None) -> Chip:
    """The TPU the kernels are being compiled for.

    In order: `pltpu.get_tpu_info()` (a TPU runtime, or tracing under `jax.set_mesh` of TPU
    devices); the abstract device of `x`'s sharding mesh (an AOT compile on a CPU host whose
    `ShapeDtypeStruct`s carry a `NamedSharding` over `jax.experimental.topologies` devices);
    else `DEFAULT_CHIP`, a conservative 64 MiB single-core plan that compiles on every target.

    Args:
      x: an operand (array, tracer or `ShapeDtypeStruct`) whose aval may name the device.
    """
    try:
        return _chip_from_info(pltpu.get_tpu_info())
    except Exception:  # noqa: BLE001 - not a TPU default device ("Unsupported TPU device kind")
        pass
    try:
        dev = jax.typeof(x).sharding.mesh.abstract_device
        version = getattr(pltpu.ChipVersion, _CHIP_VERSIONS[dev.device_kind])
        return _chip_from_info(pltpu.get_tpu_info_for_chip(version, int(dev.num_cores)))
    except Exception:  # noqa: BLE001 - no mesh, not a TPU mesh, or a chip unknown to this jax
        return DEFAULT_CHIP


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static plan of one kernel: blocks, grid sizes, VMEM estimate, TensorCores, model time."""

    bn: int
    bv: int
    bd: int
    gi: int
    gj: int
    gk: int
    rc: int  # rows per elementwise chunk (divides bn)
    vmem: int  # estimated VMEM bytes
    cores: int = 1
    seconds: float = 0.0  # roofline estimate the planner minimised


def _fit(block: int, full: int, multiple: int) -> int:
    """A legal Mosaic block: the full dim if it fits, else a multiple of `multiple`."""
    if block >= full:
        return full
    return max(multiple, block // multiple * multiple)


def _row_chunk(bn: int, bv: int, sub: int) -> int:
    rc = max(sub, ROW_CHUNK_ELEMS // bv // sub * sub)
    return rc if rc < bn and bn % rc == 0 else bn


def _hidden_blocks(d: int, block_hidden: int | None) -> list[int]:
    """Candidate `bd`: D itself (no tiling) or multiples of 128 dividing D (no ragged D tile)."""
    if d % LANES:
        return [d]
    if block_hidden:
        return [block_hidden] if block_hidden < d and d % block_hidden == 0 and \
            block_hidden % LANES == 0 else [d]
    return [d] + [bd for bd in range(256, min(d - 1, 1024) + 1, LANES) if d % bd == 0]


def _candidates(n, v, d, sub, block_tokens, block_vocab, block_hidden):
    """`(bn, bv, bd)` to consider; unless both are given, `bn * bv <= MAX_BLOCK_ELEMS`."""
    bns = sorted({_fit(b, n, sub) for b in ([block_tokens] if block_tokens else (256, 512, 1024))})
    bvs = sorted({_fit(b, v, LANES) for b in ([block_vocab] if block_vocab else
                                                (256, 512, 1024, 2048))})
    bds = _hidden_blocks(d, block_hidden)
    out = [(bn, bv, bd) for bn, bv, bd in itertools.product(bns, bvs, bds)
           if bn * bv <= MAX_BLOCK_ELEMS or (block_tokens and block_vocab)]
    return out or [(bns[0], bvs[0], bds[0])]


def _fwd_vmem(bn, bv, bd, rc, isz):
    return (2 * isz * (bn * bd + bd * bv)  # hidden + head tiles, double-buffered
            + 2 * 2 * 4 * bn * LANES  # side in + stats out, double-buffered
            + 2 * 4 * bn * bv  # logits scratch + the matmul result
            + 8 * 4 * rc * bv)  # float32 temporaries of one row chunk


def _bwd_vmem(bn, bv, bd, d, rc, isz, osz, gi):
    return (2 * isz * (2 * bn * bd + bd * bv)  # hidden, hidden^T, head tiles, double-buffered
            + 2 * 4 * bn * LANES  # side inputs
            + 2 * osz * bd * bv  # d_lm_head output tile
            + (4 * d * bv if gi > 1 else 0)  # d_lm_head float32 accumulator (all of D)
            + 2 * 4 * bn * bd  # d_hidden read-modify-write slots
            + 4 * (bn * bd + bd * bv + bn * bv)  # float32 matmul results
            + (4 + isz) * bn * bv  # logits and dz scratch
            + 8 * 4 * rc * bv)  # float32 temporaries of one row chunk


def _pick(plans: list[Plan], chip: Chip) -> Plan:
    """Among plans within 3% of the fastest modelled time that fit 3/4 of VMEM, the one with the
    smallest tiles (VMEM, Mosaic code size and compile time grow with them); if none fits, the
    one with the least VMEM."""
    fits = [p for p in plans if p.vmem <= chip.vmem_bytes * 3 // 4]
    if not fits:
        return min(plans, key=lambda p: p.vmem)
    fastest = min(p.seconds for p in fits)
    near = [p for p in fits if p.seconds <= fastest * 1.03]
    return min(near, key=lambda p: (p.bn * p.bv + p.bd * (p.bn + p.bv), -p.bv, p.seconds))


def plan_forward(n, d, v, dtype, chip: Chip, block_tokens=None, block_vocab=None,
                 block_hidden=None) -> Plan:
    """Forward blocks: the modelled-fastest `(bn, bv, bd)` whose VMEM estimate fits 3/4 of the
    chip's VMEM (explicit blocks are taken as given).

    Model: `max(FLOPs / peak, HBM bytes / (0.7 bandwidth)) + steps * 0.35 us`, FLOPs 2 NDV (x6
    for float32 at `HIGHEST`), bytes `N D` (untiled D: each token block's hidden stays in VMEM
    across vocab blocks) or `gj N D` (tiled), plus `gi D V` for the head.
    """
    isz = jnp.dtype(dtype).itemsize
    sub = 8 * (4 // isz)
    flops = chip.flops / (6 if isz == 4 else 1)
    plans = []
    for bn, bv, bd in _candidates(n, v, d, sub, block_tokens, block_vocab, block_hidden):
        gi, gj, gk = pl.cdiv(n, bn), pl.cdiv(v, bv), d // bd
        rc = _row_chunk(bn, bv, sub)
        vmem = _fwd_vmem(bn, bv, bd, rc, isz)
        hbm = isz * ((n if gk == 1 else gj * n) * d + gi * d * v)
        cores = min(chip.cores, gi)
        sec = (max(2 * gi * bn * d * gj * bv / flops, hbm / (chip.hbm_bw * _HBM_EFFICIENCY))
               + gi * gj * gk * _STEP_SECONDS) / cores
        plans.append(Plan(bn, bv, bd, gi, gj, gk, rc, vmem, cores, sec))
    return _pick(plans, chip)


def plan_backward(n, d, v, dtype, out_dtype, chip: Chip, block_tokens=None, block_vocab=None,
                  block_hidden=None, cores=None, interpret=False) -> Plan:
    """Backward blocks, as `plan_forward`, with FLOPs 6 NDV and bytes `2 gj N D` (hidden and
    hidden^T per vocab block), the head once (untiled) or `2 gi D V` (both stages), and the
    float32 `d_hidden` read-modify-write `(2 gj - 1) 4 N D`, which makes `bv` the lever.

    On a megacore chip (or with `cores=`) the vocab blocks are split over the TensorCores:
    `bv` is nudged (down to half, multiples of 128) to make the block count divisible.
    """
    isz = jnp.dtype(dtype).itemsize
    osz = jnp.dtype(out_dtype).itemsize
    # hidden^T blocks are [bd, bn]: bn is their lane dim, a multiple of 128 on a TPU.
    sub = 8 * (4 // isz) if interpret else LANES
    flops = chip.flops / (6 if isz == 4 else 1)
    ncores = chip.cores if cores is None else cores
    plans = []
    for bn, bv, bd in _candidates(n, v, d, sub, block_tokens, block_vocab, block_hidden):
        gi, gj, gk = pl.cdiv(n, bn), pl.cdiv(v, bv), d // bd
        nc = ncores
        if nc > 1 and gj % nc:
            for cand in range(bv - LANES, bv // 2 - 1, -LANES):
                if cand >= LANES and pl.cdiv(v, cand) % nc == 0:
                    bv, gj = cand, pl.cdiv(v, cand)
                    break
        if gj % nc:
            nc = 1
        rc = _row_chunk(bn, bv, 8 * (4 // isz))
        vmem = _bwd_vmem(bn, bv, bd, d, rc, isz, osz, gi)
        hbm = (isz * (2 * gj * n * d + (1 if gk == 1 else 2 * gi) * d * v)
               + 4 * (2 * gj - nc) * n * d + osz * d * v + 4 * LANES * gj * n)
        sec = (max(6 * gi * bn * d * gj * bv / flops, hbm / (chip.hbm_bw * _HBM_EFFICIENCY))
               + gj * gi * (2 if gk > 1 else 1) * gk * _STEP_SECONDS) / nc
        plans.append(Plan(bn, bv, bd, gi, gj, gk, rc, vmem, nc, sec))
    return _pick(plans, chip)


def _compiler_params(semantics, vmem_bytes: int, chip: Chip, interpret):
    """VMEM limit: the estimate x 1.5 + 8 MiB (Mosaic's own scratch), within 7/8 of the chip's
    VMEM (XLA keeps the rest; on v5e it even places the float32 d_hidden accumulator there).
    The TPU interpreter (`pltpu.InterpretParams`) reads the semantics to simulate cores."""
    if interpret is True:
        return None
    if interpret:
        return pltpu.CompilerParams(dimension_semantics=semantics)
    limit = min(int(vmem_bytes * 1.5) + 8 * MiB, chip.vmem_bytes * 7 // 8)
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=max(limit, 16 * MiB))


def _scale(acc, temperature: float):
    return acc * jnp.float32(1.0 / temperature) if temperature != 1.0 else acc


def _lane_pick(shape, *cols):
    """`(bn, 128)` block with column `cols[l]` (each `(bn, 1)`) in lane `l` (lane-dense write)."""
    lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    out = jnp.broadcast_to(cols[-1], shape)
    for l in range(len(cols) - 2, -1, -1):
        out = jnp.where(lane == l, cols[l], out)
    return out


def _row_loop(bn: int, rc: int, body):
    """`body(rows)` for each `pl.ds` row chunk of a block: a real loop (not unrolled)."""
    if rc == bn:
        body(pl.ds(0, bn))
        return

    def step(r, carry):
        body(pl.ds(pl.multiple_of(r * rc, rc), rc))
        return carry

    lax.fori_loop(0, bn // rc, step, 0)


def _accumulate(ref, value, first, idx=Ellipsis):
    """`ref[idx] = value` on the grid step where `first` (traced bool), else `ref[idx] += value`:
    no zero-initialisation pass over the accumulator."""
    @pl.when(first)
    def _set():
        ref[idx] = value

    @pl.when(jnp.logical_not(first))
    def _add():
        ref[idx] = ref[idx] + value


def _logits_block(z_sc, h_ref, w_ref, k, gk: int, precision):
    """`z_sc = sum_k h[i, k] @ W[k, j]` (float32), one D chunk per grid step `k` of `gk` (one
    plain store when D is not tiled): the logits block both kernels start from."""
    prod = lax.dot_general(h_ref[...], w_ref[...], _NN, precision=precision, preferred_element_type=jnp.float32)
    if gk == 1:
        z_sc[...] = prod
    else:
        _accumulate(z_sc, prod, k == 0)


def _when_last(idx, n_blocks: int, ragged: bool, fn):
    """`fn(False)` on all but the last block and `fn(True)` on the last (when `ragged`)."""
    if not ragged:
        fn(False)
        return
    pl.when(idx < n_blocks - 1)(lambda: fn(False))
    pl.when(idx == n_blocks - 1)(lambda: fn(True))


# --------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(h_ref, w_ref, t_ref, out_ref, m_sc, s_sc, zt_sc, *rest, v: int, p: Plan,
                temperature: float, with_entropy: bool, precision):
    we_sc = rest[0] if with_entropy else None
    z_sc = rest[-1]
    bn, bv, gj, gk, rc = p.bn, p.bv, p.gj, p.gk, p.rc
    j, k = pl.program_id(1), pl.program_id(2)

    @pl.when((j == 0) & (k == 0))
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        zt_sc[...] = jnp.zeros(zt_sc.shape, jnp.float32)
        if with_entropy:
            we_sc[...] = jnp.zeros(we_sc.shape, jnp.float32)

    _logits_block(z_sc, h_ref, w_ref, k, gk, precision)

    def fold(last_vocab_block: bool):
        def rows_body(rows):
            z = _scale(z_sc[rows, :], temperature)  # [rc, bv] float32
            col = lax.broadcasted_iota(jnp.int32, z.shape, 1)
            is_t = col == t_ref[rows, 0:1] - j * bv
            if last_vocab_block:  # columns >= V: garbage; a target id >= V must not hit them
                valid = col < v - (gj - 1) * bv
                z = jnp.where(valid, z, NEG)
                is_t = is_t & valid
            zt_sc[rows, :] += jnp.sum(jnp.where(is_t, z, 0.0), axis=1, keepdims=True)
            m, s, we = online_update(z, m_sc[rows, :], s_sc[rows, :],
                                     we_sc[rows, :] if with_entropy else None,
                                     with_entropy=with_entropy)
            m_sc[rows, :] = m
            s_sc[rows, :] = s
            if with_entropy:
                we_sc[rows, :] = we

        _row_loop(bn, rc, rows_body)

    pl.when(k == gk - 1)(lambda: _when_last(j, gj, v % bv != 0, fold))

    @pl.when((j == gj - 1) & (k == gk - 1))
    def _done():
        lse, ent = finalize(m_sc[...], s_sc[...], we_sc[...] if with_entropy else None,
                            with_entropy=with_entropy)
        cols = (lse, zt_sc[...], ent) if with_entropy else (lse, zt_sc[...])
        out_ref[...] = _lane_pick(out_ref.shape, *cols)


def forward(hidden, lm_head, targets, *, temperature: float = 1.0, with_entropy: bool = False,
            block_tokens: int | None = None, block_vocab: int | None = None,
            block_hidden: int | None = None, interpret=False):
    """Statistics of the scaled logits with the Mosaic kernel.

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]` (same dtype); targets: `[N] int32`.
      block_tokens, block_vocab, block_hidden: override the planned blocks (`block_hidden`
        tiles D only if it is a multiple of 128 dividing D).
      interpret: False (Mosaic), True (the generic Pallas interpreter) or a
        `pltpu.InterpretParams` (TPU interpret mode: simulated DMAs, semaphores, cores, races).

    Returns:
      `(lse, z_target, entropy or None)`, each `[N] float32`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    chip = DEFAULT_CHIP if interpret else chip_for(hidden)
    p = plan_forward(n, d, v, hidden.dtype, chip, block_tokens, block_vocab, block_hidden)
    bn, bv, bd = p.bn, p.bv, p.bd
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    side = jnp.pad(targets.astype(jnp.int32)[:, None], ((0, 0), (0, LANES - 1)))
    scratch = [pltpu.VMEM((bn, 1), jnp.float32)] * (4 if with_entropy else 3)
    scratch.append(pltpu.VMEM((bn, bv), jnp.float32))  # logits (accumulated over D tiles)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, v=v, p=p, temperature=temperature,
                          with_entropy=with_entropy, precision=precision),
        grid=(p.gi, p.gj, p.gk),
        in_specs=[pl.BlockSpec((bn, bd), lambda i, j, k: (i, k)),
                  pl.BlockSpec((bd, bv), lambda i, j, k: (k, j)),
                  pl.BlockSpec((bn, LANES), lambda i, j, k: (i, 0))],
        out_specs=pl.BlockSpec((bn, LANES), lambda i, j, k: (i, 0)),
        out_shape=out_struct((n, LANES), jnp.float32, hidden),
        scratch_shapes=scratch,
        compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary"), p.vmem, chip,
                                         interpret),
        interpret=interpret,
        name="token_logprobs_fwd",
    )(hidden, lm_head, side)
    return out[:, 0], out[:, 1], (out[:, 2] if with_entropy else None)


# --------------------------------------------------------------------------------------------
# backward


def _bwd_kernel(h_ref, ht_ref, w_ref, side_ref, dw_ref, dh_hbm, z_sc, dz_sc, dh_buf, rd_sem,
                wr_sem, *rest, n: int, v: int, p: Plan, temperature: float, has_c: bool,
                precision):
    dw_sc = rest[0] if p.gi > 1 else None
    bn, bv, bd, gi, gj, gk, rc = p.bn, p.bv, p.bd, p.gi, p.gj, p.gk, p.rc
    gjc = gj // p.cores
    last_s = 1 if gk > 1 else 0
    c, jj, i, s, k = (pl.program_id(a) for a in range(5))
    j = c * gjc + jj  # global vocab block
    t_step = (jj * gi + i) * gk + k  # this core's d_hidden step counter (last stage only)
    slot = t_step % 2
    ragged_v, ragged_n = v % bv != 0, n % bn != 0

    if ragged_v:  # head columns >= V are garbage: zero them in the VMEM tile (last block only)
        rem = v - (gj - 1) * bv

        @pl.when(j == gj - 1)
        def _zero_tail():
            w_ref[:, rem:] = jnp.zeros((w_ref.shape[0], bv - rem), w_ref.dtype)

    @pl.when(s == 0)
    def _logits():
        _logits_block(z_sc, h_ref, w_ref, k, gk, precision)

    def dz_block(mask_cols: bool, mask_rows: bool):
        """dz of the whole (j, i) block into dz_sc, by row chunks; masks only where needed."""
        def rows_body(rows):
            z = _scale(z_sc[rows, :], temperature)
            side = side_ref[rows, :]
            t = lax.bitcast_convert_type(side[:, 0:1], jnp.int32) - j * bv
            col = lax.broadcasted_iota(jnp.int32, z.shape, 1)
            dz = logit_grad(z, col == t, side[:, 1:2], side[:, 2:3], side[:, 3:4],
                            side[:, 4:5] if has_c else None)
            if mask_cols:
                dz = jnp.where(col < v - (gj - 1) * bv, dz, 0.0)
            if mask_rows:
                row = rows.start + lax.broadcasted_iota(jnp.int32, z.shape, 0)
                dz = jnp.where(row < n - (gi - 1) * bn, dz, 0.0)
            dz_sc[rows, :] = dz.astype(dz_sc.dtype)

        _row_loop(bn, rc, rows_body)

    @pl.when((s == last_s) & (k == 0))
    def _dz():
        _when_last(j, gj, ragged_v,
                   lambda mc: _when_last(i, gi, ragged_n, lambda mr: dz_block(mc, mr)))

    @pl.when(s == last_s)
    def _grads():
        dz = dz_sc[...]
        # d_lm_head[k, j] += hidden^T[k, i] @ dz: accumulated over i in VMEM, written at the
        # last token block (the output block's index only moves on then).
        dw_part = lax.dot_general(ht_ref[...], dz, _NN, precision=precision,
                                  preferred_element_type=jnp.float32)
        drows = (pl.ds(pl.multiple_of(k * bd, bd) if gk > 1 else 0, bd), slice(None))
        if gi == 1:
            dw_ref[...] = dw_part.astype(dw_ref.dtype)
        else:
            pl.when(i < gi - 1)(lambda: _accumulate(dw_sc, dw_part, i == 0, drows))

            @pl.when(i == gi - 1)
            def _dw_out():
                dw_ref[...] = (dw_sc[drows] + dw_part).astype(dw_ref.dtype)

        # d_hidden[i, k] += dz @ W[k, j]^T: read-modify-write of this core's float32 partial in
        # HBM through two VMEM slots; the write of step t is waited for at step t + 2.
        tile = dh_hbm.at[c, pl.ds(pl.multiple_of(i * bn, bn), bn),
                         pl.ds(pl.multiple_of(k * bd, bd) if gk > 1 else 0, bd)]
        read = pltpu.make_async_copy(tile, dh_buf.at[slot], rd_sem.at[0])
        write = pltpu.make_async_copy(dh_buf.at[slot], tile, wr_sem.at[slot])
        other = pltpu.make_async_copy(dh_buf.at[1 - slot], tile, wr_sem.at[1 - slot])
        if gi * gk == 1:  # a single tile: the previous step wrote the very tile read next
            pl.when(t_step >= 1)(other.wait)
        else:
            pl.when(t_step >= 2)(write.wait)
        pl.when(jj > 0)(read.start)
        dh_part = lax.dot_general(dz, w_ref[...], _NT, precision=precision,
                                  preferred_element_type=jnp.float32)
        @pl.when(jj == 0)
        def _dh_first():
            dh_buf[slot] = dh_part

        @pl.when(jj > 0)
        def _dh_add():
            read.wait()
            dh_buf[slot] += dh_part

        write.start()

        @pl.when((jj == gjc - 1) & (i == gi - 1) & (k == gk - 1))
        def _drain():  # this core's last d_hidden step: no write may stay in flight
            write.wait()
            if gi * gk > 1:
                other.wait()


def backward(hidden, lm_head, targets, lse, a, b, c, *, temperature: float = 1.0,
             block_tokens: int | None = None, block_vocab: int | None = None,
             block_hidden: int | None = None, cores: int | None = None,
             interpret=False):
    """`d_hidden`, `d_lm_head` for `dz = a [j == t] + p (b + c y)` (coefficients as in `_math`),
    with one fused kernel (one logits recompute).

    Args:
      hidden: `[N, D]`; lm_head: `[D, V]` (same dtype); targets: `[N] int32`; lse: `[N] float32`;
      a, b: `[N] float32`; c: `[N] float32` or None; already divided by the temperature.
      block_tokens, block_vocab, block_hidden: override the planned blocks.
      cores: split the vocab blocks over this many TensorCores (default: the chip's; > 1 also
        runs, sequentially, on one core, which is how interpret mode tests it).
      interpret: as in `forward`.

    Returns:
      `(d_hidden [N, D] hidden.dtype, d_lm_head [D, V] lm_head.dtype)`.
    """
    n, d = hidden.shape
    v = lm_head.shape[1]
    chip = DEFAULT_CHIP if interpret else chip_for(hidden)
    p = plan_backward(n, d, v, hidden.dtype, lm_head.dtype, chip, block_tokens, block_vocab,
                      block_hidden, cores, interpret)
    bn, bv, bd, gi, gk, nc = p.bn, p.bv, p.bd, p.gi, p.gk, p.cores
    gjc = p.gj // nc
    last_s = 1 if gk > 1 else 0
    rows = gi * bn
    precision = matmul_precision(hidden.dtype, lm_head.dtype)
    has_c = c is not None
    # Per-token inputs in one lane-dense (rows, 128) block: target bits, lse, a, b[, c]; padded
    # rows are zeros (and masked in the kernel).
    cols = [lax.bitcast_convert_type(targets.astype(jnp.int32), jnp.float32)] + [
        x.astype(jnp.float32) for x in ((lse, a, b, c) if has_c else (lse, a, b))]
    side = jnp.pad(jnp.stack(cols, axis=1), ((0, rows - n), (0, LANES - len(cols))))
    hidden_t = jnp.pad(hidden, ((0, rows - n), (0, 0))).T  # [D, rows]: one XLA transpose

    scratch = [pltpu.VMEM((bn, bv), jnp.float32),  # logits
               pltpu.VMEM((bn, bv), hidden.dtype),  # dz, in the MXU's input dtype
               pltpu.VMEM((2, bn, bd), jnp.float32),  # d_hidden read-modify-write slots
               pltpu.SemaphoreType.DMA((1,)), pltpu.SemaphoreType.DMA((2,))]
    if gi > 1:
        scratch.append(pltpu.VMEM((d, bv), jnp.float32))  # d_lm_head accumulator
    d_lm_head, dh_acc = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, v=v, p=p, temperature=temperature, has_c=has_c,
                          precision=precision),
        grid=(nc, gjc, gi, last_s + 1, gk),
        in_specs=[
            # hidden[i, k] in stage 0; stage 1 keeps the last one (no refetch).
            pl.BlockSpec((bn, bd), lambda c, j, i, s, k: (i, jnp.where(s == 0, k, gk - 1))),
            # hidden^T[k, i] in the last stage; stage 0 already holds the first one.
            pl.BlockSpec((bd, bn), lambda c, j, i, s, k: (jnp.where(s == last_s, k, 0), i)),
            pl.BlockSpec((bd, bv), lambda c, j, i, s, k: (k, c * gjc + j)),
            pl.BlockSpec((bn, LANES), lambda c, j, i, s, k: (i, 0)),
        ],
        out_specs=[
            # d_lm_head[k, j] is complete at the last token block; before that the index stays
            # (0, j), so every block's visits are consecutive and it is written once.
            pl.BlockSpec((bd, bv), lambda c, j, i, s, k: (
                jnp.where((i == gi - 1) & (s == last_s), k, 0), c * gjc + j)),
            pl.BlockSpec(memory_space=pl.ANY),  # float32 d_hidden partials, one per core
        ],
        out_shape=[out_struct((d, v), lm_head.dtype, hidden),
                   out_struct((nc, rows, d), jnp.float32, hidden)],
        scratch_shapes=scratch,
        compiler_params=_compiler_params(("parallel",) + ("arbitrary",) * 4, p.vmem, chip,
                                         interpret),
        interpret=interpret,
        name="token_logprobs_bwd",
    )(hidden, hidden_t, lm_head, side)
    d_hidden = dh_acc[0] if nc == 1 else jnp.sum(dh_acc, axis=0)
    return d_hidden[:n].astype(hidden.dtype), d_lm_head

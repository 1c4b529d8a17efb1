"""`jaxrl_rm.kernels.token_logprobs`: every implementation against the dense reference.

Values and gradients (w.r.t. hidden and lm_head, through log-probs and entropy, temperature
!= 1) on shapes that no block size divides; bf16 inputs; the Pallas kernels (Mosaic and Triton
flavours) in interpret mode; vocab-parallel under shard_map on 8 fake CPU devices (subprocess).
"""

from __future__ import annotations

import itertools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidevice import run_with_devices

from jaxrl_rm.kernels import IMPLS, token_logprobs, token_logprobs_reference
from jaxrl_rm.kernels import logprobs as lp

F32_TOL = 1e-5
# Small blocks so that every kernel runs several token and vocab blocks and ragged edges.
IMPL_KW = {
    "chunked": {"impl": "chunked", "block_tokens": 32, "block_vocab": 256},
    "pallas_tpu": {"impl": "pallas", "pallas_platform": "tpu", "block_tokens": 32,
                   "block_vocab": 256},
    "pallas_gpu": {"impl": "pallas", "pallas_platform": "gpu", "block_tokens": 32,
                   "block_vocab": 128},
}


def _inputs(n, d, v, dtype=jnp.float32, seed=0, scale=0.3):
    """numpy RNG (no per-shape jax.random compiles): hidden [n, d], lm_head [d, v], targets [n]."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(dtype)
    lm_head = jnp.asarray(scale * rng.standard_normal((d, v), np.float32)).astype(dtype)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return hidden, lm_head, targets


def _loss_fn(targets, with_entropy, temperature, **kw):
    """A scalar with generic per-token cotangents on logp (and entropy), for value+grad tests."""
    n = targets.shape[0]
    g_logp = jnp.cos(jnp.arange(n, dtype=jnp.float32))
    g_ent = jnp.sin(1.0 + jnp.arange(n, dtype=jnp.float32))

    def loss(hidden, lm_head):
        out = token_logprobs(hidden, lm_head, targets, temperature=temperature,
                             with_entropy=with_entropy, **kw)
        if with_entropy:
            logp, ent = out
            return jnp.sum(g_logp * logp) + jnp.sum(g_ent * ent), out
        return jnp.sum(g_logp * out), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def assert_close(x, ref, tol, what=""):
    """Elementwise within `tol` relative, with an absolute floor of `tol * max|ref|` (a gradient
    that is exactly 0 in the reference, e.g. V == 1, may come out as 1e-11)."""
    x = np.asarray(jnp.asarray(x, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert x.shape == ref.shape, (what, x.shape, ref.shape)
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-3)
    np.testing.assert_allclose(x, ref, rtol=tol, atol=tol * scale, err_msg=what)


_REF_CACHE: dict = {}


def _reference(hidden, lm_head, targets, with_entropy, temperature):
    """Reference value+grads, cached: several implementations compare against the same one."""
    key = tuple(np.asarray(x).tobytes() for x in (hidden, lm_head, targets)) + (
        hidden.dtype.name, hidden.shape, lm_head.shape, with_entropy, temperature)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = _loss_fn(targets, with_entropy, temperature,
                                   impl="reference")(hidden, lm_head)
    return _REF_CACHE[key]


def _check_against_reference(hidden, lm_head, targets, with_entropy, temperature, tol,
                             grad_tol=None, **kw):
    (_, out), grads = _loss_fn(targets, with_entropy, temperature, **kw)(hidden, lm_head)
    (_, ref_out), ref_grads = _reference(hidden, lm_head, targets, with_entropy, temperature)
    for name, a, b in zip(("logp", "entropy"), jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        assert a.dtype == jnp.float32, name
        assert_close(a, b, tol, name)
    for name, g, g_ref, x in zip(("d_hidden", "d_lm_head"), grads, ref_grads, (hidden, lm_head)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, g_ref, grad_tol or tol, name)


# ---------------------------------------------------------------------------------- float32


@pytest.mark.parametrize("shape,temperature,with_entropy", [
    ((77, 96, 1003), 1.0, False), ((77, 96, 1003), 1.0, True),
    ((77, 96, 1003), 0.7, False), ((77, 96, 1003), 0.7, True),
    ((64, 32, 1024), 0.7, True),  # blocks divide V: no overlapped last vocab block
    ((5, 16, 37), 1.3, True),     # fewer tokens / vocab than one block
])
def test_chunked_matches_reference_f32(shape, temperature, with_entropy):
    hidden, lm_head, targets = _inputs(*shape)
    _check_against_reference(hidden, lm_head, targets, with_entropy, temperature, F32_TOL,
                             **IMPL_KW["chunked"])


@pytest.mark.parametrize("blocks", [{}, {"block_tokens": 8, "block_vocab": 100},
                                    {"block_tokens": 1000, "block_vocab": 5000},
                                    {"block_tokens": 1, "block_vocab": 1}])
def test_chunked_block_sizes(blocks):
    """Defaults, ragged blocks, a single block and degenerate 1x1 blocks all agree."""
    hidden, lm_head, targets = _inputs(23, 24, 301, seed=3)
    _check_against_reference(hidden, lm_head, targets, True, 1.3, F32_TOL, impl="chunked",
                             **blocks)


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("platform", ["pallas_tpu", "pallas_gpu"])
def test_pallas_interpret_matches_reference_f32(platform, with_entropy):
    hidden, lm_head, targets = _inputs(77, 96, 1003, seed=1)
    _check_against_reference(hidden, lm_head, targets, with_entropy, 0.7, F32_TOL,
                             **IMPL_KW[platform])


def test_pallas_tpu_single_block_full_dims():
    """Blocks larger than the arrays fall back to full-dimension blocks (legal on Mosaic)."""
    hidden, lm_head, targets = _inputs(13, 40, 200, seed=2)
    _check_against_reference(hidden, lm_head, targets, True, 1.0, F32_TOL, impl="pallas",
                             pallas_platform="tpu")


def test_large_logits_and_peaked_distributions():
    """Big logits (no overflow in the online sum-exp) and near-zero entropies stay accurate."""
    hidden, lm_head, targets = _inputs(40, 32, 500, seed=4, scale=3.0)
    targets = jnp.argmax(hidden @ lm_head, axis=-1).astype(jnp.int32)  # confident tokens
    _check_against_reference(hidden, lm_head, targets, True, 0.5, 1e-4, **IMPL_KW["chunked"])


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 24), v=st.integers(1, 300),
       bt=st.integers(1, 48), bv=st.integers(1, 320), ent=st.booleans(),
       temp=st.sampled_from([0.5, 1.0, 2.0]))
def test_chunked_property_random_shapes(n, d, v, bt, bv, ent, temp):
    hidden, lm_head, targets = _inputs(n, d, v, seed=n * 1000 + v)
    _check_against_reference(hidden, lm_head, targets, ent, temp, 2e-5, impl="chunked",
                             block_tokens=bt, block_vocab=bv)


# ---------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_bf16_inputs_accumulate_in_float32(impl):
    """bf16 hidden/head: log-probs and entropy are float32 and match the float32 reference of
    the same bf16 values closely (products are exact in f32, sums are f32); gradients come back
    in bf16 (the backward feeds bf16 dz to the matmuls, as on the MXU)."""
    hidden, lm_head, targets = _inputs(77, 96, 1003, dtype=jnp.bfloat16, seed=5)
    _check_against_reference(hidden, lm_head, targets, True, 0.7, 1e-4, grad_tol=3e-2,
                             **IMPL_KW[impl])


@pytest.mark.parametrize("shape,with_entropy", [((77, 96, 1003), True), ((1024, 64, 2048), False)])
def test_chunked_bf16_one_block_at_default_block_sizes(shape, with_entropy):
    """N <= 1024, V <= 2048 at the default blocks: one token block and one vocab block. XLA
    drops the one-trip loops and used to fold hidden^T back into the d_lm_head dot, a
    bf16 x bf16 -> f32 "TN" dot XLA:CPU cannot run (`UNIMPLEMENTED ... DotThunk`)."""
    hidden, lm_head, targets = _inputs(*shape, dtype=jnp.bfloat16, seed=6)
    _check_against_reference(hidden, lm_head, targets, with_entropy, 0.7, 1e-4, grad_tol=3e-2,
                             impl="chunked")


MIXED_IMPL_KW = {"reference": {"impl": "reference"}, "chunked_default": {"impl": "chunked"},
                 **IMPL_KW}


@pytest.mark.parametrize("impl", list(MIXED_IMPL_KW))
def test_f32_head_next_to_bf16_hidden_is_cast_to_bf16(impl):
    """bf16 compute with float32 parameters: the head is cast to the hidden's dtype, as the
    sampler's logits are, so log-probs are those of the bf16-rounded head (not a float32
    HIGHEST matmul of the unrounded head, 2e-2 away here); d_lm_head comes back float32,
    d_hidden bf16."""
    hidden, _, targets = _inputs(77, 96, 1003, dtype=jnp.bfloat16, seed=7)
    _, head32, _ = _inputs(77, 96, 1003, seed=7)
    (_, out), (d_hidden, d_head) = _loss_fn(targets, True, 0.7, **MIXED_IMPL_KW[impl])(hidden, head32)
    (_, ref_out), ref_grads = _reference(hidden, head32.astype(jnp.bfloat16), targets, True, 0.7)
    for name, a, b in zip(("logp", "entropy"), out, ref_out):
        assert a.dtype == jnp.float32, name
        assert_close(a, b, 1e-5, name)
    assert d_hidden.dtype == jnp.bfloat16 and d_head.dtype == jnp.float32
    assert_close(d_hidden, ref_grads[0], 3e-2, "d_hidden")
    assert_close(d_head, ref_grads[1], 3e-2, "d_lm_head")


# ---------------------------------------------------------------------------------- Pallas TPU
# The Mosaic kernels called directly (interpret mode), on the paths `token_logprobs` reaches
# only at real sizes: D tiled over a grid axis, several token / vocab / D blocks with ragged
# edges, the elementwise row-chunk loop, the vocab split over two TensorCores, and the
# double-buffered d_hidden DMA under the TPU interpreter's race detector.


def _kernel_oracle(hidden, lm_head, targets, temperature, with_entropy, seed=11):
    """Dense statistics (float32 reference) and, in float64 numpy, the backward of generic
    per-token cotangents (a, b, c) at those statistics (a float32 oracle's own rounding is of
    the order of the tolerance at D = 256)."""
    from jaxrl_rm.kernels.reference import reference_stats

    n, v = targets.shape[0], lm_head.shape[1]
    lse, zt, ent = reference_stats(hidden, lm_head, targets, temperature=temperature,
                                   with_entropy=with_entropy)
    rng = np.random.default_rng(seed)
    a, b, c = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(3))
    c = c if with_entropy else None
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    h64, w64 = f64(hidden), f64(lm_head)
    y = h64 @ w64 / temperature - f64(lse)[:, None]
    coef = f64(b)[:, None] + (f64(c)[:, None] * y if with_entropy else 0.0)
    dz = f64(a)[:, None] * (np.arange(v) == np.asarray(targets)[:, None]) + np.exp(y) * coef
    return (lse, zt, ent), (a, b, c), (dz @ w64.T, h64.T @ dz)


def _check_tpu_kernels(n, d, v, *, dtype=jnp.float32, temperature=0.7, with_entropy=True,
                       tol=F32_TOL, grad_tol=None, seed=0, **kw):
    from jaxrl_rm.kernels import pallas_tpu

    hidden, lm_head, targets = _inputs(n, d, v, dtype=dtype, seed=seed)
    (lse, zt, ent), (a, b, c), grads = _kernel_oracle(hidden, lm_head, targets, temperature,
                                                      with_entropy)
    kw.setdefault("interpret", True)
    fwd_kw = {k: x for k, x in kw.items() if k != "cores"}
    out = pallas_tpu.forward(hidden, lm_head, targets, temperature=temperature,
                             with_entropy=with_entropy, **fwd_kw)
    for name, x, ref in zip(("lse", "z_target", "entropy"), out, (lse, zt, ent)):
        if ref is not None:
            assert x.dtype == jnp.float32 and x.shape == (n,), name
            assert_close(x, ref, tol, name)
    d_hidden, d_lm_head = pallas_tpu.backward(hidden, lm_head, targets, lse, a, b, c,
                                              temperature=temperature, **kw)
    for name, g, ref, x in zip(("d_hidden", "d_lm_head"), (d_hidden, d_lm_head), grads,
                               (hidden, lm_head)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close(g, ref, grad_tol or tol, name)


# (n, d, v), blocks: 3 token blocks (ragged), 4 vocab blocks (ragged), 3 D tiles of 128.
TPU_TILED = dict(block_tokens=32, block_vocab=256, block_hidden=128)


@pytest.mark.parametrize("shape,kw", [
    ((77, 384, 1003), TPU_TILED),  # D tiled: two-stage backward, every edge ragged
    ((77, 384, 1003), {**TPU_TILED, "cores": 2}),  # vocab blocks split over two cores
    ((64, 256, 1024), TPU_TILED),  # blocks divide N and V: no masks, no padding
    ((16, 96, 1003), {"block_tokens": 16, "block_vocab": 128}),  # one [bn, bd] d_hidden tile
    ((16, 256, 1003), {"block_tokens": 16, "block_vocab": 256, "block_hidden": 128,
                       "cores": 2}),  # one token block, D tiled, two cores
    ((40, 128, 1003), {"block_tokens": 40, "block_vocab": 1003}),  # full-dimension blocks
])
def test_pallas_tpu_kernels_blocks_and_tiles(shape, kw):
    _check_tpu_kernels(*shape, **kw)


@pytest.mark.parametrize("with_entropy,temperature", [(True, 1.0), (False, 1.3)])
def test_pallas_tpu_kernels_bf16_d_tiled(with_entropy, temperature):
    """bf16 operands on the MXU path with float32 accumulation over D tiles and token blocks:
    statistics at float32 accuracy, gradients (bf16 dz, bf16 outputs) at bf16 accuracy."""
    _check_tpu_kernels(77, 256, 1003, dtype=jnp.bfloat16, temperature=temperature,
                       with_entropy=with_entropy, tol=1e-4, grad_tol=3e-2, **TPU_TILED)


def test_pallas_tpu_kernels_row_chunk_loop(monkeypatch):
    """The elementwise work runs in a `fori_loop` over row chunks of a block (4 chunks here)."""
    from jaxrl_rm.kernels import pallas_tpu

    monkeypatch.setattr(pallas_tpu, "ROW_CHUNK_ELEMS", 8 * 256)
    assert pallas_tpu._row_chunk(32, 256, 8) == 8
    _check_tpu_kernels(77, 256, 1003, **TPU_TILED)
    _check_tpu_kernels(77, 96, 1003, dtype=jnp.bfloat16, tol=1e-4, grad_tol=3e-2,
                       block_tokens=32, block_vocab=256)  # bf16 chunks: 16 rows


def test_pallas_tpu_target_outside_vocab_hits_no_padded_column():
    """Ids >= V (another vocab shard's tokens) land in the last block's padding columns: the
    last-block mask keeps them from matching, so z_target is 0 as in the chunked path."""
    from jaxrl_rm.kernels import chunked, pallas_tpu

    hidden, lm_head, targets = _inputs(40, 64, 1003, seed=12)
    targets = targets.at[::3].set(1003 + 17)  # column 1020 < 4 * 256: inside the last block
    got = pallas_tpu.forward(hidden, lm_head, targets, with_entropy=True, interpret=True,
                             block_tokens=16, block_vocab=256)
    want = chunked.forward(hidden, lm_head, targets, with_entropy=True, block_vocab=256)
    assert np.all(np.asarray(got[1])[::3] == 0.0)
    for name, x, ref in zip(("lse", "z_target", "entropy"), got, want):
        assert_close(x, ref, F32_TOL, name)


def test_pallas_tpu_backward_dma_has_no_races_on_two_cores():
    """TPU interpret mode simulates the d_hidden read-modify-write DMAs asynchronously (a DMA
    lands when waited for), two TensorCores taking the 'parallel' vocab halves, and checks
    every access with a happens-before race detector."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                   out_of_bounds_reads="uninitialized")
    for n, d, kw in ((77, 256, {**TPU_TILED, "cores": 2}),  # slots alternate, two cores
                     (16, 96, {"block_tokens": 16, "block_vocab": 128})):  # one d_hidden tile
        _check_tpu_kernels(n, d, 1003, interpret=params, **kw)  # the backward runs last
        assert not tpu_interpreter.races.races_found, kw  # the detector's state of that run


def _dots_in(jaxpr) -> list:
    """Every dot_general in a jaxpr, recursing into sub-jaxprs (pallas_call bodies, conds)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots_in(inner)
    return found


def test_pallas_tpu_flops_are_8_ndv():
    """One logits matmul in the forward; three in the fused backward (logits, hidden^T @ dz,
    dz @ W^T), each executed once per (token, vocab, D) block: 2 + 6 = 8 N D V FLOPs (the
    two-kernel backward it replaces recomputed the logits twice: 10 N D V)."""
    from jaxrl_rm.kernels import pallas_tpu

    hidden, lm_head, targets = _inputs(64, 256, 1024)
    vec = jnp.zeros(64, jnp.float32)
    fwd = jax.make_jaxpr(lambda h, w: pallas_tpu.forward(h, w, targets, interpret=True,
                                                          **TPU_TILED))(hidden, lm_head)
    bwd = jax.make_jaxpr(lambda h, w: pallas_tpu.backward(h, w, targets, vec, vec, vec, vec,
                                                           interpret=True, **TPU_TILED))(
        hidden, lm_head)
    assert len(_dots_in(fwd.jaxpr)) == 1
    assert len(_dots_in(bwd.jaxpr)) == 3
    assert pallas_tpu.FLOPS_PER_NDV == {"forward": 2, "backward": 6}


@pytest.mark.parametrize("chip_name,cores", [("TPU_V5E", 1), ("TPU_V5P", 2), ("TPU_V6E", 1)])
def test_pallas_tpu_plans_fit_each_generation(chip_name, cores):
    """Blocks per generation (from `pltpu.get_tpu_info_for_chip`, no device needed) across the
    issue's matrix: legal Mosaic blocks, the VMEM estimate within 3/4 of the chip's VMEM and
    the compiler limit within its capacity, the vocab split evenly over a megacore's two
    TensorCores. (That they compile is checked by tests/test_tpu_aot.py with libtpu.)"""
    from jax.experimental.pallas import tpu as pltpu

    from jaxrl_rm.kernels import pallas_tpu as pt

    info = pltpu.get_tpu_info_for_chip(getattr(pltpu.ChipVersion, chip_name), cores)
    chip = pt._chip_from_info(info)
    assert chip.cores == cores and chip.vmem_bytes == info.vmem_capacity_bytes
    for d, v, dtype, n in itertools.product((896, 1536, 2048, 3584, 4096, 8192),
                                            (32000, 128256, 151936), ("bfloat16", "float32"),
                                            (4096, 1000)):
        f = pt.plan_forward(n, d, v, dtype, chip)
        b = pt.plan_backward(n, d, v, dtype, dtype, chip)
        for p in (f, b):
            what = (chip_name, n, d, v, dtype, p)
            assert p.vmem <= chip.vmem_bytes * 3 // 4, what
            assert p.bv % 128 == 0 and p.bn * p.bv <= pt.MAX_BLOCK_ELEMS, what
            assert d % p.bd == 0 and (p.bd == d or p.bd % 128 == 0), what
            assert p.bn % p.rc == 0 and p.gi * p.bn >= n and p.gj * p.bv >= v, what
            limit = pt._compiler_params(("parallel",), p.vmem, chip, False).vmem_limit_bytes
            assert p.vmem < limit <= chip.vmem_bytes, what
        assert f.bn % 16 == 0 or f.bn == n, what
        assert b.bn % 128 == 0 or b.bn == n, what  # hidden^T blocks [bd, bn]: bn is lanes
        assert b.gj % b.cores == 0 and b.cores == (2 if cores == 2 else 1), what


def test_pallas_tpu_chip_without_a_tpu_is_the_conservative_default():
    from jaxrl_rm.kernels import pallas_tpu as pt

    assert pt.chip_for(jnp.zeros((4, 4))) == pt.DEFAULT_CHIP
    assert pt.DEFAULT_CHIP.vmem_bytes == 64 * 2**20 and pt.DEFAULT_CHIP.cores == 1


# ---------------------------------------------------------------------------------- API


def test_forward_only_and_dtypes():
    hidden, lm_head, targets = _inputs(30, 16, 77)
    logp = jax.jit(lambda h, w: token_logprobs(h, w, targets))(hidden, lm_head)
    ref = token_logprobs_reference(hidden, lm_head, targets)
    assert logp.shape == (30,) and logp.dtype == jnp.float32
    assert_close(logp, ref, F32_TOL)
    assert bool(jnp.all(logp <= 0))


def test_auto_dispatch_per_backend(monkeypatch):
    """auto: chunked on CPU and GPU (Triton kernels opt-in until timed on a GPU), Mosaic on TPU;
    Pallas is interpreted wherever the backend is not the kernels' platform."""
    assert jax.default_backend() == "cpu"
    assert lp._resolve("auto", None, None)[0] == "chunked"
    assert lp._resolve("pallas", None, None) == ("pallas", "tpu", True)
    assert lp._resolve("pallas", "gpu", None) == ("pallas", "gpu", True)
    for backend, expected in (("tpu", ("pallas", "tpu", False)), ("gpu", ("chunked", "gpu", False))):
        monkeypatch.setattr(lp.jax, "default_backend", lambda b=backend: b)
        assert lp._resolve("auto", None, None) == expected
    assert set(IMPLS) == {"auto", "reference", "chunked", "pallas"}


def test_bad_arguments_raise_clear_errors():
    hidden, lm_head, targets = _inputs(4, 8, 10)
    with pytest.raises(ValueError, match="impl="):
        token_logprobs(hidden, lm_head, targets, impl="fast")
    with pytest.raises(ValueError, match="does not match"):
        token_logprobs(hidden, lm_head[:4], targets)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(hidden, lm_head, targets[:3])
    with pytest.raises(ValueError, match="flatten"):
        token_logprobs(hidden[None], lm_head, targets)


def test_chunked_backward_saves_no_vocab_sized_buffer():
    """XLA's temporary buffers of grad(chunked) stay far below one [N, V] float32 array."""
    n, d, v = 512, 64, 32_000
    hidden, lm_head, targets = (jax.ShapeDtypeStruct((n, d), jnp.float32),
                                jax.ShapeDtypeStruct((d, v), jnp.float32),
                                jax.ShapeDtypeStruct((n,), jnp.int32))

    def temp_bytes(impl, **kw):
        f = lambda h, w, t: jnp.sum(token_logprobs(h, w, t, impl=impl, with_entropy=True,
                                                   **kw)[0])
        lowered = jax.jit(jax.grad(f, argnums=(0, 1))).lower(hidden, lm_head, targets)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    ref = temp_bytes("reference")
    chunked = temp_bytes("chunked", block_tokens=512, block_vocab=1024)
    assert ref >= n * v * 4
    assert chunked * 16 <= ref, (chunked, ref)


# ---------------------------------------------------------------------------------- sharded

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from jaxrl_rm.kernels import token_logprobs, token_logprobs_sharded
    assert jax.device_count() == 8, jax.devices()

    def inputs(n, d, v, seed):
        rng = np.random.default_rng(seed)
        return (jnp.asarray(rng.standard_normal((n, d), np.float32)),
                jnp.asarray(0.3 * rng.standard_normal((d, v), np.float32)),
                jnp.asarray(rng.integers(0, v, n), jnp.int32))

    def value_and_grads(h, w, t, **kw):
        gl = jnp.cos(jnp.arange(t.shape[0], dtype=jnp.float32))
        ge = jnp.sin(1.0 + jnp.arange(t.shape[0], dtype=jnp.float32))
        def loss(h, w):
            logp, ent = token_logprobs(h, w, t, temperature=0.7, with_entropy=True, **kw)
            return jnp.sum(gl * logp) + jnp.sum(ge * ent), (logp, ent)
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
        return [np.asarray(x) for x in (*out, *grads)]

    def close(a, b, tol, what):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b)), err_msg=what)

    names = ("logp", "entropy", "d_hidden", "d_lm_head")
    cases = [
        # (mesh shape (data, fsdp, tensor), impl kwargs, N, D, V)
        ((2, 1, 4), dict(impl="chunked", block_tokens=16, block_vocab=128), 80, 48, 1000),
        ((1, 1, 8), dict(impl="chunked"), 37, 32, 1000),
        ((2, 2, 2), dict(impl="chunked", block_vocab=96), 64, 24, 502),
        ((2, 1, 4), dict(impl="pallas", pallas_platform="tpu", block_tokens=16,
                         block_vocab=128), 32, 32, 1000),
        # data-parallel only (tensor = 1): tokens split, the head replicated, no vocab combine
        ((8, 1, 1), dict(impl="chunked", block_tokens=16, block_vocab=128), 64, 32, 1000),
        ((2, 4, 1), dict(impl="pallas", pallas_platform="tpu", block_tokens=8,
                         block_vocab=128), 64, 32, 1000),
    ]
    for shape, kw, n, d, v in cases:
        h, w, t = inputs(n, d, v, seed=n + v)
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
        single = value_and_grads(h, w, t, **kw)  # itself checked against the reference above
        tok = tuple(a for a, s in zip(("data", "fsdp"), shape) if s > 1) or None
        if n % int(np.prod(shape[:2])) == 0:
            h = jax.device_put(h, NamedSharding(mesh, P(tok, None)))
            t = jax.device_put(t, NamedSharding(mesh, P(tok)))
        else:  # tokens not divisible over data x fsdp: replicate them
            mesh = jax.make_mesh((1, 1, shape[2]), ("data", "fsdp", "tensor"),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 3)
        w = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
        sharded = value_and_grads(h, w, t, mesh=mesh, **kw)
        for name, a, b in zip(names, sharded, single):
            close(a, b, 1e-5, f"{shape} {kw} {name} vs single-device")
        print("ok", shape, kw["impl"])

    # Tokens that do not divide over data x fsdp (an odd evaluation batch) are padded, not
    # gathered: 37 tokens on 8 data shards.
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    h, w, t = inputs(37, 16, 300, seed=5)
    single = value_and_grads(h, w, t, impl="chunked")
    for name, a, b in zip(names, value_and_grads(h, w, t, impl="chunked", mesh=mesh), single):
        close(a, b, 1e-5, f"37 tokens on 8 shards: {name}")

    # The explicit entry point, forward only, tokens over data and fsdp.
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    h, w, t = inputs(64, 16, 300, seed=7)
    logp = jax.jit(lambda h, w, t: token_logprobs_sharded(h, w, t, mesh=mesh))(h, w, t)
    close(np.asarray(logp), np.asarray(token_logprobs(h, w, t, impl="reference")), 1e-5, "fwd")

    # bf16 hidden next to a float32 head (bf16 compute, float32 parameters): each shard computes
    # with the bf16-rounded head, as one device does, and d_lm_head comes back float32.
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    h, w, t = inputs(64, 32, 1000, seed=11)
    h = h.astype(jnp.bfloat16)
    single = value_and_grads(h, w.astype(jnp.bfloat16), t, impl="chunked")
    sharded = value_and_grads(jax.device_put(h, NamedSharding(mesh, P("data", None))),
                              jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))),
                              jax.device_put(t, NamedSharding(mesh, P("data"))),
                              mesh=mesh, impl="chunked")
    assert str(sharded[2].dtype) == "bfloat16" and sharded[3].dtype == np.float32
    for name, a, b, tol in zip(names, sharded, single, (1e-5, 1e-5, 3e-2, 3e-2)):
        close(a.astype(np.float32), b.astype(np.float32), tol, f"bf16 hidden, f32 head: {name}")
    try:
        token_logprobs_sharded(h, w[:, :299], t, mesh=mesh)
        raise AssertionError("expected ValueError for V % tensor != 0")
    except ValueError as e:
        assert "divisible" in str(e)
    print("ALL OK")
    """
)


def test_sharded_logprobs_8_devices():
    """`token_logprobs(mesh=...)` under shard_map on 8 fake CPU devices (data-parallel tokens,
    vocab-parallel head, both) equals single-device (values and gradients). A subprocess,
    because the device count is fixed when jax initialises."""
    out = run_with_devices(_SHARDED_SCRIPT, n=8, timeout=600)
    assert "ALL OK" in out, out

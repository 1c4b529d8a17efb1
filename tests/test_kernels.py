"""`jaxrl_rm.kernels.token_logprobs`: every implementation against the dense reference.

Values and gradients (w.r.t. hidden and lm_head, through log-probs and entropy, temperature
!= 1) on shapes that no block size divides; bf16 inputs; the Pallas kernels (Mosaic and Triton
flavours) in interpret mode; vocab-parallel under shard_map on 8 fake CPU devices (subprocess).
"""

from __future__ import annotations

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

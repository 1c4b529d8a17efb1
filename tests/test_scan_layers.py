"""Layer layouts and remat: the scanned stack (`[L, ...]` weights, `lax.scan`) computes what the
unrolled one does (values, gradients, KV-cache decode, samples), every remat policy gives the same
loss and gradients as none, HF export/import converts between layouts exactly, stacked weights get
a replicated leading dim in the sharding rules, and a checkpoint resumes within a layout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_rm.models import hf
from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.transformer import REMAT_POLICIES, Transformer, unstack_layers
from jaxrl_rm.parallel.rules import logical_axes_for
from jaxrl_rm.train.sft import next_token_loss

L = 3
# q/k/v bias *and* q/k norm: every kind of layer parameter; GQA; untied head.
CFG = ModelConfig.for_family("qwen3", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             attention_bias=True)


def _model(scan_layers, remat="none", seed=3):
    return Transformer(CFG, rngs=nnx.Rngs(seed), scan_layers=scan_layers, remat=remat)


def _params(model) -> dict:
    """Pure param dict with per-layer `layers` (unstacked when scanned)."""
    return hf.per_layer_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), scan_layers=model.scan_layers)


def _batch():
    """Two packed segments in row 0, left padding in row 1."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 6 + [0], [0] * 3 + [1] * 9], np.int32)
    return {"input_ids": ids, "attention_mask": seg > 0, "loss_mask": seg > 0, "segment_ids": seg}


@functools.lru_cache(maxsize=None)
def _loss_and_grads(scan_layers, remat):
    model = _model(scan_layers, remat)
    graphdef, state = nnx.split(model)

    def loss(state, batch):
        total, count, _ = next_token_loss(nnx.merge(graphdef, state), batch)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(state, _batch())
    grads = hf.per_layer_params(nnx.to_pure_dict(grads), scan_layers=scan_layers)
    return float(value), grads


def _assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_same_seed_same_weights_and_stacked_shapes():
    unrolled, scanned = _model(False), _model(True)
    stacked = nnx.state(scanned, nnx.Param)["layers"]["attn"]["q_proj"]["kernel"][...]
    assert stacked.shape == (L, 32, 32)
    assert "0" not in {str(k) for k in nnx.to_pure_dict(nnx.state(scanned))["layers"]}
    _assert_trees_close(_params(unrolled), _params(scanned), rtol=0, atol=0)  # bit-identical init


def test_scanned_matches_unrolled_logits_and_grads():
    b = _batch()
    logits = jax.jit(lambda m: m(b["input_ids"], attention_mask=b["attention_mask"], segment_ids=b["segment_ids"]))
    np.testing.assert_allclose(np.asarray(logits(_model(True))), np.asarray(logits(_model(False))), atol=2e-6, rtol=0)
    lu, gu = _loss_and_grads(False, "none")
    ls, gs = _loss_and_grads(True, "none")
    assert abs(lu - ls) < 1e-6
    _assert_trees_close(gs, gu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_remat_policy_same_loss_and_grads(remat, scan_layers):
    base_loss, base_grads = _loss_and_grads(scan_layers, "none")
    loss, grads = _loss_and_grads(scan_layers, remat)
    assert abs(loss - base_loss) < 1e-6
    _assert_trees_close(grads, base_grads, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_remat_is_applied_per_layer(scan_layers):
    """The policy reaches the backward pass: one checkpoint per layer unrolled, one inside the scan."""
    def count(remat):
        graphdef, state = nnx.split(_model(scan_layers, remat))
        b = _batch()
        grad = jax.grad(lambda s: next_token_loss(nnx.merge(graphdef, s), b)[0])
        return str(jax.make_jaxpr(grad)(state)).count("differentiated=True")  # a remat in the backward

    assert count("none") == 0
    assert count("full") == (1 if scan_layers else L)
    with pytest.raises(ValueError, match="remat must be one of"):
        _model(scan_layers, "everything")


def test_remat_lowers_saved_activations():
    """Compiled for CPU (compile only): full remat needs less temp memory than saving everything."""
    cfg = ModelConfig.for_family("qwen2", vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def temp(remat):
        graphdef, state = nnx.split(Transformer(cfg, scan_layers=True, remat=remat))

        def loss(state, ids):
            m = nnx.merge(graphdef, state)
            return next_token_loss(m, {"input_ids": ids, "attention_mask": ids >= 0, "loss_mask": ids >= 0})[0]

        return jax.jit(jax.grad(loss)).lower(state, ids).compile().memory_analysis().temp_size_in_bytes

    assert temp("full") < 0.6 * temp("none")


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_kv_cache_layout_and_decode(scan_layers):
    model = _model(scan_layers)
    cache = model.init_cache(2, 16)
    if scan_layers:
        assert isinstance(cache, tuple) and cache[0].shape == (L, 2, 2, 16, 8)
    else:
        assert len(cache) == L and cache[0][0].shape == (2, 2, 16, 8)
    ids = _batch()["input_ids"][:, :9]
    full = jax.jit(lambda m, ids: m.hidden_states(ids))(model, ids)

    @jax.jit
    def prefill_and_step(m, c):
        kv_mask = jnp.arange(16)[None] < 9
        h, c = m.decode(ids[:, :8], c, positions=jnp.broadcast_to(jnp.arange(8), (2, 8)), cache_index=0,
                        kv_mask=kv_mask)
        return h, m.decode(ids[:, 8:9], c, positions=jnp.full((2, 1), 8), cache_index=8, kv_mask=kv_mask)[0]

    h, h2 = prefill_and_step(model, cache)
    np.testing.assert_allclose(np.asarray(h), np.asarray(full[:, :8]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(h2[:, 0]), np.asarray(full[:, 8]), atol=2e-6)


def test_sampler_same_samples_in_both_layouts():
    from jaxrl_rm.sampling import generate

    prompts = [[5, 6, 7], [9] * 10, [3]]
    kw = dict(max_new_tokens=12, num_samples=2, temperature=1.0, seed=4)
    a, b = generate(_model(False), prompts, **kw), generate(_model(True), prompts, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_hf_export_converts_between_layouts(tmp_path):
    """Scanned -> HF -> unrolled -> HF -> scanned: exact weights and the same logits."""
    scanned = _model(True, seed=7)
    hf.save_model(scanned, tmp_path / "a")
    unrolled = hf.load_model(tmp_path / "a")
    assert not unrolled.scan_layers
    hf.save_model(unrolled, tmp_path / "b")
    again = hf.load_model(tmp_path / "b", scan_layers=True, remat="full")
    assert again.scan_layers and again.remat == "full"
    _assert_trees_close(_params(unrolled), _params(scanned), rtol=0, atol=0)
    _assert_trees_close(nnx.to_pure_dict(nnx.state(again, nnx.Param)),
                        nnx.to_pure_dict(nnx.state(scanned, nnx.Param)), rtol=0, atol=0)
    ids = _batch()["input_ids"]
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(unrolled(ids)), atol=2e-6)


def test_sharding_rules_for_stacked_weights():
    assert logical_axes_for("layers/attn/q_proj/kernel", 3) == ("layers", "embed", "heads")
    assert logical_axes_for("layers/0/attn/q_proj/kernel", 2) == ("embed", "heads")
    assert logical_axes_for("backbone/layers/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    assert logical_axes_for("backbone/layers/12/input_norm/scale", 1) == (None,)
    assert logical_axes_for("layers/input_norm/scale", 2) == ("layers", None)
    assert logical_axes_for("layers/attn/k_proj/bias", 2) == ("layers", "heads")
    assert logical_axes_for("embed", 2) == ("vocab", "embed")
    # every parameter of a scanned model and reward model has a rule
    from jaxrl_rm.models.reward import RewardModel
    from jaxrl_rm.parallel.rules import _path_str

    for m in (_model(True), RewardModel(CFG, scan_layers=True)):
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m, nnx.Param))):
            p = _path_str(path)
            axes = logical_axes_for(p, x.ndim)
            assert ("layers" in axes) == ("/layers/" in f"/{p}"), (p, axes)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_checkpoint_resumes_within_a_layout(scan_layers, tmp_path):
    """Save after two steps, restore into a fresh run's state: the next step is the same."""
    from jaxrl_rm.config import OptimConfig
    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.train.checkpoint import Checkpointer
    from jaxrl_rm.train.state import Trainer, abstract_like, build_train_step, make_optimizer

    def fresh(scan):
        model = _model(scan)
        trainer = Trainer(nnx.split(model)[0], make_optimizer(OptimConfig(warmup_steps=0), 10), make_mesh(1, 1, 1))
        return trainer, trainer.init_state(model, 0)

    trainer, state = fresh(scan_layers)
    step = build_train_step(trainer, next_token_loss)
    batch = _batch()
    for _ in range(2):
        state, _ = step(state, batch)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=1, async_save=False)
    ckpt.save(2, state)
    ckpt.wait()
    ref_state, ref = step(state, batch)

    restored, _, at = ckpt.restore(abstract_like(fresh(scan_layers)[1]))  # a new run's state
    assert at == 2
    _, got = step(restored, batch)
    assert float(got["loss"]) == float(ref["loss"])
    with pytest.raises(ValueError, match="model.scan_layers"):  # the other layout: a clear error
        ckpt.restore(abstract_like(fresh(not scan_layers)[1]))
    ckpt.close()

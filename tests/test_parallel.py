"""Sharding: a train step on a data=2 x fsdp=2 x tensor=2 mesh gets its batch split over (data, fsdp)
and equals the single-device step (the loss's log-probs under shard_map, as the SFT trainer runs it)."""

from multidevice import run_with_devices


def test_sharded_train_step_matches_single_device():
    out = run_with_devices("""
        import functools
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxrl_rm.config import OptimConfig
        from jaxrl_rm.models.config import ModelConfig
        from jaxrl_rm.models.transformer import Transformer
        from jaxrl_rm.parallel.mesh import make_mesh
        from jaxrl_rm.parallel.rules import shard_batch
        from jaxrl_rm.train.sft import next_token_loss
        from jaxrl_rm.train.state import Trainer, build_train_step, make_optimizer

        assert jax.device_count() == 8
        cfg = ModelConfig.for_family("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 128, size=(8, 16)).astype(np.int32)
        mask = np.ones((8, 16), bool); mask[::2, 12:] = False
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}

        def run(mesh, micro, optimizer):
            model = Transformer(cfg, rngs=nnx.Rngs(0))
            trainer = Trainer(nnx.split(model)[0], optimizer, mesh)
            state = trainer.init_state(model, 0)
            step = build_train_step(trainer, functools.partial(next_token_loss, mesh=mesh), micro_batches=micro)
            losses = []
            for _ in range(2):
                device_batch = shard_batch(batch, mesh)
                rows = 8 // (mesh.shape["data"] * mesh.shape["fsdp"])  # the batch is split, not copied
                for x in device_batch.values():
                    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2), x.sharding
                    assert {s.data.shape[0] for s in x.addressable_shards} == {rows}
                state, m = step(state, device_batch)
                losses.append(float(m["loss"]))
            return losses, jax.device_get(state["params"]), state

        one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        adamw = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)
        single, p1, _ = run(one, 1, adamw)
        sharded, p8, state8 = run(make_mesh(2, 2, 2), 1, adamw)
        accum, p4, _ = run(make_mesh(2, 2, 2), 4, adamw)
        # weights really are sharded over fsdp and tensor
        spec = state8["params"]["layers"][0]["mlp"]["gate_proj"]["kernel"].sharding.spec
        assert tuple(spec) == ("fsdp", "tensor"), spec
        # and so are Adam's moments, like their parameters (left to XLA they came back replicated:
        # the whole optimizer state on every chip), before and after a step
        adam = state8["opt_state"][1][0]
        for moments in (adam.mu, adam.nu):
            for p_leaf, m_leaf in zip(jax.tree.leaves(state8["params"]), jax.tree.leaves(moments)):
                assert m_leaf.sharding.is_equivalent_to(p_leaf.sharding, p_leaf.ndim), (m_leaf.sharding, p_leaf.sharding)
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
        np.testing.assert_allclose(accum, single, rtol=1e-5)
        # Parameters: compared under SGD. Adam divides each gradient by its own RMS, which turns
        # float32 reduction-order noise (1e-9) on near-zero gradient entries into O(1) relative
        # update differences; SGD keeps the update proportional to the (sharding-exact) gradient.
        sgd = optax.sgd(0.1)
        _, s1, _ = run(one, 1, sgd)
        _, s8, _ = run(make_mesh(2, 2, 2), 1, sgd)
        _, s4, _ = run(make_mesh(2, 2, 2), 4, sgd)
        for a, b, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), jax.tree.leaves(s4)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-7)
        # AdamW parameters: the update as a whole agrees (relative norm), element noise aside
        p0 = jax.tree.leaves(nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
        d1 = np.concatenate([np.ravel(a - z) for a, z in zip(jax.tree.leaves(p1), p0)])
        d8 = np.concatenate([np.ravel(b - z) for b, z in zip(jax.tree.leaves(p8), p0)])
        assert np.linalg.norm(d8 - d1) / np.linalg.norm(d1) < 1e-3
        print("OK", single, sharded)
    """)
    assert "OK" in out


def test_scanned_layers_sharding_train_step_and_sampler():
    """Scanned layout on a 2 x 2 x 2 mesh: stacked weights keep their layer dim replicated and the
    rest sharded as unrolled; a train step (SGD) and greedy / sampled decoding over the stacked
    KV cache equal one device's."""
    out = run_with_devices("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from jaxrl_rm.models.config import ModelConfig
        from jaxrl_rm.models.transformer import Transformer
        from jaxrl_rm.parallel.mesh import make_mesh
        from jaxrl_rm.parallel.rules import param_shardings, shard_batch
        from jaxrl_rm.sampling import generate
        from jaxrl_rm.train.sft import next_token_loss
        from jaxrl_rm.train.state import Trainer, build_train_step

        cfg = ModelConfig.for_family("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
        mesh = make_mesh(2, 2, 2)
        unrolled = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
        pure = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0), scan_layers=True)))
        specs = jax.tree.map(lambda s: tuple(s.spec), param_shardings(pure, mesh))
        flat = jax.tree.map(lambda s: tuple(s.spec), param_shardings(unrolled, mesh))
        for name, layer_spec in jax.tree_util.tree_leaves_with_path(flat["layers"][0], is_leaf=lambda x: isinstance(x, tuple)):
            stacked = specs["layers"]
            for k in name:
                stacked = stacked[k.key]
            assert stacked == (None,) + layer_spec, (name, stacked, layer_spec)
        assert specs["layers"]["mlp"]["gate_proj"]["kernel"] == (None, "fsdp", "tensor")
        assert specs["layers"]["attn"]["o_proj"]["kernel"] == (None, "tensor", "fsdp")

        rng = np.random.default_rng(0)
        ids = rng.integers(0, 128, size=(8, 16)).astype(np.int32)
        mask = np.ones((8, 16), bool); mask[::2, 12:] = False
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}

        def run(mesh):
            model = Transformer(cfg, rngs=nnx.Rngs(0), scan_layers=True, remat="dots_saveable")
            trainer = Trainer(nnx.split(model)[0], optax.sgd(0.1), mesh)
            state = trainer.init_state(model, 0)
            spec = (None, "fsdp", "tensor") if mesh.size > 1 else (None, None, None)
            assert tuple(state["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec) == spec
            step = build_train_step(trainer, lambda m, b: next_token_loss(m, b, mesh=mesh))
            losses = []
            for _ in range(2):
                state, m = step(state, shard_batch(batch, mesh))
                losses.append(float(m["loss"]))
            return losses, jax.device_get(state["params"])

        single, p1 = run(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        sharded, p8 = run(mesh)
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)

        model = Transformer(cfg, rngs=nnx.Rngs(0), scan_layers=True)
        prompts = [rng.integers(1, 128, n).tolist() for n in (3, 11, 7, 1, 16, 5)]
        kw = dict(max_new_tokens=12, stop_token_ids=[5])
        state = nnx.state(model)
        tp_model = nnx.merge(nnx.graphdef(model), jax.device_put(state, param_shardings(state, mesh)))
        for extra in (dict(greedy=True), dict(num_samples=2, temperature=1.0, seed=3)):
            one = generate(model, prompts, **extra, **kw)
            tp = generate(tp_model, prompts, mesh=mesh, **extra, **kw)
            np.testing.assert_array_equal(np.asarray(tp.tokens), np.asarray(one.tokens))
            np.testing.assert_allclose(np.asarray(tp.logprobs), np.asarray(one.logprobs), atol=1e-5)
        print("OK", single, sharded)
    """)
    assert "OK" in out

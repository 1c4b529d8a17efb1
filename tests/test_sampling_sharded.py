"""Sampler on 8 fake CPU devices: rows sharded over (data, fsdp), weights tensor-sharded; same
output as one device."""

from multidevice import run_with_devices


def test_sharded_generate_matches_single_device():
    out = run_with_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxrl_rm.models.config import ModelConfig
        from jaxrl_rm.models.transformer import Transformer
        from jaxrl_rm.parallel.mesh import make_mesh
        from jaxrl_rm.parallel.rules import param_shardings
        from jaxrl_rm.sampling import generate, teacher_forced_logprobs
        from jaxrl_rm.sampling import sampler as sampler_mod

        assert jax.device_count() == 8
        # what the sampler core receives: prompt rows (and each row's uniforms) split over
        # (data, fsdp), rows / (data * fsdp) on each device - not copied to every device
        SEEN = []
        _core = sampler_mod._generate_jit
        def core(graphdef, state, head, prompt_ids, prompt_lens, live, uniforms, *rest, **kw):
            SEEN.append([(prompt_ids, 0), (prompt_lens, 0), (live, 0), (uniforms, 1)])
            return _core(graphdef, state, head, prompt_ids, prompt_lens, live, uniforms, *rest, **kw)
        sampler_mod._generate_jit = core

        def assert_rows_split(mesh):
            shards = mesh.shape["data"] * mesh.shape["fsdp"]
            assert SEEN
            for x, axis in SEEN.pop():
                spec = [None] * x.ndim
                spec[axis] = ("data", "fsdp")
                assert x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim), x.sharding
                assert {s.data.shape[axis] for s in x.addressable_shards} == {x.shape[axis] // shards}
            SEEN.clear()
        cfg = ModelConfig.for_family("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, 128, n).tolist() for n in (3, 11, 7, 1, 16, 5)]
        kw = dict(max_new_tokens=12, stop_token_ids=[5])

        single = generate(model, prompts, greedy=True, **kw)
        single_s = generate(model, prompts, num_samples=2, temperature=1.0, seed=3, **kw)

        # rows sharded over data (8-way): 6 prompts are padded to 8 rows
        mesh = make_mesh(8, 1, 1)
        dp = generate(model, prompts, greedy=True, mesh=mesh, **kw)
        assert_rows_split(mesh)
        np.testing.assert_array_equal(np.asarray(dp.tokens), np.asarray(single.tokens))
        np.testing.assert_array_equal(np.asarray(dp.lengths), np.asarray(single.lengths))
        dp_s = generate(model, prompts, num_samples=2, temperature=1.0, seed=3, mesh=mesh, **kw)
        assert_rows_split(mesh)
        np.testing.assert_array_equal(np.asarray(dp_s.tokens), np.asarray(single_s.tokens))
        np.testing.assert_allclose(np.asarray(dp_s.logprobs), np.asarray(single_s.logprobs), atol=1e-5)

        # data x fsdp x tensor = 2 x 2 x 2 with the weights sharded by the project's rules
        mesh = make_mesh(2, 2, 2)
        state = nnx.state(model)
        state = jax.device_put(state, param_shardings(state, mesh))
        tp_model = nnx.merge(nnx.graphdef(model), state)
        spec = tp_model.layers[0].mlp.gate_proj.kernel[...].sharding.spec
        assert tuple(spec) == ("fsdp", "tensor"), spec
        tp = generate(tp_model, prompts, greedy=True, mesh=mesh, **kw)
        assert_rows_split(mesh)
        np.testing.assert_array_equal(np.asarray(tp.tokens), np.asarray(single.tokens))
        tp_s = generate(tp_model, prompts, num_samples=2, temperature=1.0, seed=3, mesh=mesh, **kw)
        assert_rows_split(mesh)
        np.testing.assert_allclose(np.asarray(tp_s.logprobs),
                                   np.asarray(teacher_forced_logprobs(model, tp_s)), atol=1e-4)
        print("OK", np.asarray(single.lengths).tolist())
    """)
    assert "OK" in out

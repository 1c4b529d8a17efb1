"""The slot engine on a mesh (8 fake CPU devices): one slot group per data shard, driven together
as one SPMD program per call. The samples are those of the one-device engine for the same seed
(rows inserted mid-flight, per-request budgets, stop tokens, the tail compaction), each device
holds only its own groups' caches (`[n, ...]` over ("data", "fsdp"), KV heads over "tensor"), and
the rollout collector runs it under a GRPO-style mesh with tensor-sharded weights, shared prefixes
included."""

from multidevice import run_with_devices

_SETUP = """
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxrl_rm.models.config import ModelConfig
    from jaxrl_rm.models.transformer import Transformer
    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.parallel.rules import param_shardings
    from jaxrl_rm.rollout import Request, SlotEngine
    from jaxrl_rm.rollout import step as step_mod

    assert jax.device_count() == 8
    cfg = ModelConfig.for_family("qwen2", vocab_size=97, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

    def model_on(mesh):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        if mesh is None:
            return model
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh)))

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 97, size=n).tolist() for n in [5, 12, 1, 9, 7, 3, 4, 8, 2, 6, 11, 10]]
    reqs = [Request(p, num_samples=3, max_new_tokens=6 + 2 * i) for i, p in enumerate(prompts)]
    kw = dict(max_prompt_len=16, max_new_tokens=32, temperature=1.0, top_k=20, stop_token_ids=[5], steps_per_sync=5)
"""


def test_mesh_slot_groups_equal_one_device_and_split_the_caches():
    out = run_with_devices(_SETUP + """
    one = SlotEngine(model_on(None), num_slots=8, host_threads=1, **kw).run(reqs, seed=3)
    ref = {k: np.asarray(getattr(one, k)) for k in ("tokens", "lengths", "logprobs", "unfiltered_logprobs")}
    assert (ref["lengths"] < 6 + 2 * np.repeat(np.arange(12), 3)).any()  # some rows end on the stop id

    SEEN = []
    _decode = step_mod.decode_groups_jit
    def decode(graph, weights, head, dstate, *rest, **kw_):  # record before the call donates it
        SEEN.append([(x.shape, x.sharding, [s.data.shape for s in x.addressable_shards])
                     for x in jax.tree.leaves((dstate.prompt_cache, dstate.completion_cache))])
        return _decode(graph, weights, head, dstate, *rest, **kw_)
    step_mod.decode_groups_jit = decode

    # (mesh shape, slots): 8 groups of 2 slots; 4 groups of 8 slots with KV heads over tensor
    # (weights tensor- and fsdp-sharded), compacting 8 -> 4 in the tail
    for shape, slots in ((dict(data=8), 16), (dict(data=2, fsdp=2, tensor=2), 32)):
        SEEN.clear()
        mesh = make_mesh(**shape)
        groups = shape["data"] * shape.get("fsdp", 1)
        engine = SlotEngine(model_on(mesh), num_slots=slots, mesh=mesh, **kw)
        res = engine.run(reqs, seed=3)
        for k in ("tokens", "lengths"):
            np.testing.assert_array_equal(np.asarray(getattr(res, k)), ref[k], err_msg=f"{shape} {k}")
        for k in ("logprobs", "unfiltered_logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(res, k)), ref[k], atol=2e-5, err_msg=f"{shape} {k}")
        assert engine.stats.groups == groups and engine.stats.useful_tokens == int(ref["lengths"].sum())
        assert engine.stats.compactions == (groups if slots == 32 else 0), engine.stats

        # every cache leaf: groups over (data, fsdp), one group's rows per data shard; KV heads over tensor
        tensor = shape.get("tensor", 1)
        assert SEEN and len(SEEN[0]) == 2 * 2 * cfg.num_hidden_layers  # K and V, prompt and completion
        for leaf_shape, sharding, shard_shapes in SEEN[0]:
            assert leaf_shape[0] == groups, (leaf_shape, groups)
            spec = [("data", "fsdp")] + [None] * (len(leaf_shape) - 1)
            if tensor > 1:
                spec[-3] = "tensor"
            assert sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), len(leaf_shape)), sharding
            assert {s[0] for s in shard_shapes} == {1}
            assert {s[-3] for s in shard_shapes} == {leaf_shape[-3] // tensor}

        # warmup compiles every program a run uses: a second run traces nothing
        engine.warmup()
        before = dict(step_mod.TRACE_COUNT)
        engine.run(reqs[:5], seed=4)
        assert step_mod.TRACE_COUNT == before, (before, step_mod.TRACE_COUNT)
    print("OK")
    """)
    assert "OK" in out


def test_collector_runs_slot_groups_on_the_run_mesh():
    """`RolloutCollector(engine="slots", mesh=...)` (what GRPO builds) samples on a data x tensor
    mesh the rows the static engine samples on the same mesh, with int8 KV too."""
    out = run_with_devices(_SETUP + """
    from jaxrl_rm.rollout.collect import RolloutCollector

    mesh = make_mesh(data=4, tensor=2)
    model = model_on(mesh)
    for kv in (None, "int8"):
        got = {}
        for engine in ("static", "slots"):
            c = RolloutCollector(engine=engine, max_prompt_len=16, max_new_tokens=12, temperature=1.0,
                                 stop_token_ids=[5], pad_id=0, mesh=mesh, kv_cache_dtype=kv)
            got[engine] = c.generate(model, prompts[:6], num_samples=4, seed=7)
            assert c.stats.engine == engine and c.stats.useful_tokens > 0
        a, b = got["static"], got["slots"]
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
        np.testing.assert_allclose(np.where(a.mask, a.logprobs, 0), np.where(b.mask, b.logprobs, 0), atol=2e-5)

    # shared prefixes on the mesh: 4 questions x 3 responses after one template, each group's
    # prefix slots its own
    template = rng.integers(1, 97, size=12).tolist()
    judge_like = [template + q + rng.integers(1, 97, size=3).tolist()
                  for q in [rng.integers(1, 97, size=6).tolist() for _ in range(4)] for _ in range(3)]
    got = {}
    for engine in ("static", "slots"):
        c = RolloutCollector(engine=engine, max_prompt_len=24, max_new_tokens=8, temperature=1.0, pad_id=0,
                             mesh=mesh, max_prefix_len=20)
        got[engine] = (c.generate(model, judge_like, num_samples=2, seed=2), c.stats)
    (a, sa), (b, sb) = got["static"], got["slots"]
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.where(a.mask, a.logprobs, 0), np.where(b.mask, b.logprobs, 0), atol=2e-5)
    assert sb.prefill_tokens < sa.prefill_tokens, (sa, sb)
    print("OK")
    """)
    assert "OK" in out

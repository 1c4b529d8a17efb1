"""The log-prob hot loop compiled for real TPUs on a CPU machine (libtpu, ahead of time).

Nothing runs: `jaxrl_rm.parallel.aot` compiles for abstract TPU devices of a topology, Mosaic
included, and reads back per-chip memory and the collectives XLA inserted. These tests prove
(a) the Pallas kernels compile for every TPU generation at real widths, with no more working
memory than the chunked XLA path; (b) under a data-parallel mesh every chip computes only its own
tokens: no activation all-gather, per-chip working memory ∝ 1/chips. The full matrix runs in
`python benchmarks/logprob.py --tpu-aot v5e:2x2` (and v5p, v6e); CI runs the covering subset here.

Needs libtpu (`pip install -e ".[tpu-aot]"`); skipped without it, except where
`JAXRL_RM_REQUIRE_TPU_AOT=1` (CI) makes a missing libtpu a failure.
"""

import pytest

from conftest import require_tpu_aot
from jaxrl_rm.parallel import aot

MIB = 2**20

require_tpu_aot()

pytestmark = pytest.mark.tpu_aot


def _activation_gathers(report, n_tokens):
    """All-gathers whose result has a token dimension (shards of `n_tokens` rows gathered)."""
    return [s for s in report.all_gather_shapes if s and s[0] >= n_tokens // 8 and len(s) <= 2
            and s[0] % 8 == 0 and s[0] in {n_tokens, n_tokens // 2, n_tokens // 4}]


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_data_parallel_logprobs_split_tokens_on_v5e_2x4(impl):
    """8 chips on `data`: no all-gather at all (the head is replicated, each chip keeps its own
    rows), and per-chip working memory at most a sixth of one chip's for the same global batch,
    plus one buffer of the head's gradient: each chip's partial gradient of the replicated head
    before its all-reduce, which libtpu 0.0.42 (jax 0.10) reduces in place and libtpu 0.0.48
    (jax 0.11) does not (`D V` bf16, 125 MiB here; it does not shrink with chips, and FSDP
    shards it). Without the mesh (XLA's partitioner alone) the chunked path gathers the whole
    hidden: the layout this replaces, kept here as the broken variant the assertion must tell
    apart."""
    n, d, v = 65536, 2048, 32000
    one = aot.token_logprobs_report(aot.tpu_mesh("v5e:2x4", (1, 1, 1)), n=n, d=d, v=v, impl=impl)
    eight = aot.token_logprobs_report(aot.tpu_mesh("v5e:2x4", (8, 1, 1)), n=n, d=d, v=v, impl=impl)
    print(f"\n{impl}: per-chip temp 1 chip {one.temp_bytes / MIB:.1f} MiB, 8 chips "
          f"{eight.temp_bytes / MIB:.1f} MiB; collectives {eight.collectives}")
    assert "all-gather" not in eight.collectives, eight.all_gather_shapes
    head_gradient = d * v * 2
    assert eight.temp_bytes <= max(one.temp_bytes, 6 * MIB) / 6 + head_gradient, (one, eight)
    # the gradient of the replicated head is the only reduction (plus the loss)
    assert set(eight.collectives) == {"all-reduce"}, eight.collectives
    if impl == "chunked":
        unsharded = aot.token_logprobs_report(aot.tpu_mesh("v5e:2x4", (8, 1, 1)), n=n, d=d, v=v,
                                              impl=impl, sharded=False)
        assert (n, d) in unsharded.all_gather_shapes, unsharded.all_gather_shapes
        assert unsharded.temp_bytes > 4 * eight.temp_bytes


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_fsdp_and_tensor_mesh_gathers_weights_only(impl):
    """data 2 x fsdp 2 x tensor 2, the head sharded as the parameter rules shard it: the only
    all-gather is the head's (FSDP's weight gather, after the cast to bf16), never tokens."""
    n, d, v = 16384, 2048, 32000
    mesh = aot.tpu_mesh("v5e:2x4", (2, 2, 2))
    rep = aot.token_logprobs_report(mesh, n=n, d=d, v=v, impl=impl, head_dtype="float32")
    for shape in rep.all_gather_shapes:
        assert shape == (d, v // 2), rep.all_gather_shapes  # the bf16 head over fsdp, per vocab shard
    assert rep.collectives.get("all-gather", 0) <= 2


# A covering subset of the matrix (the benchmark runs all of it): every generation, both
# dtypes, D whole and tiled (the planner tiles D where whole-D tiles do not fit or cost more),
# vocabularies that are and are not multiples of the planned vocab block, the vocab split over
# v5p's two TensorCores, forward + backward, entropy and temperature. The last two columns are
# the backward plan's, asserted: D tiled (`gk > 1`), V a multiple of the vocab block.
MATRIX = [
    # topology,  D,    V,      dtype,      entropy, tiled, even V
    ("v5e:2x2", 896, 151936, "bfloat16", False, False, False),
    ("v5e:2x2", 4096, 128256, "bfloat16", True, True, False),
    ("v5e:2x2", 2048, 32000, "float32", False, True, True),
    ("v5p:2x2x1", 3584, 152064, "bfloat16", False, True, False),
    # The two-kernel version before the fused one failed here (CompileTimeScopedVmemOom in the
    # forward, 16.46M of 16.00M): its blocks (256 x 512, f32, D 1536) were estimated under
    # 12 MiB, so it left Mosaic's default 16 MiB scoped-VMEM limit in place; the kernels now
    # always set the limit, per chip, from an estimate that counts the elementwise temporaries.
    ("v5p:2x2x1", 1536, 151936, "float32", True, False, False),
    ("v5p:2x2x1", 3584, 128256, "float32", True, True, True),
    ("v6e:2x2", 8192, 128256, "bfloat16", False, True, False),
    ("v6e:2x2", 2048, 151936, "bfloat16", True, False, False),
    ("v6e:2x2", 4096, 151936, "float32", False, True, False),
]


def _backward_plan(mesh, n, d, v, dtype):
    """The backward blocks the kernel plans for the mesh's chip (named by its abstract device)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxrl_rm.kernels import pallas_tpu

    h = jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype), sharding=NamedSharding(mesh, P()))
    chip = pallas_tpu.chip_for(h)
    return chip, pallas_tpu.plan_backward(n, d, v, dtype, dtype, chip)


@pytest.mark.parametrize("topology,d,v,dtype,entropy,tiled,even_v", MATRIX)
def test_pallas_compiles_within_chunked_memory(topology, d, v, dtype, entropy, tiled, even_v):
    """Mosaic compiles the Pallas forward + backward with the blocks planned for the chip, and
    its working memory stays within the chunked XLA path's + 64 MiB (bf16; float32: within its
    d_hidden accumulators and hidden^T + 64 MiB, see below), at 4096 tokens on one chip."""
    mesh = aot.tpu_mesh(topology, (1, 1, 1))
    n = 4096
    chip, plan = _backward_plan(mesh, n, d, v, dtype)
    assert chip.name == topology.split(":")[0] and chip.cores == (2 if "v5p" in topology else 1)
    assert ((plan.gk > 1), (v % plan.bv == 0), plan.cores) == (tiled, even_v, chip.cores), plan
    kw = dict(n=n, d=d, v=v, dtype=dtype, with_entropy=entropy, temperature=0.7 if entropy else 1.0)
    pallas = aot.token_logprobs_report(mesh, impl="pallas", **kw)
    if dtype == "float32":
        # XLA:TPU takes 100-300 s here to compile the chunked path in float32 (17-96 s in bf16), so
        # the float32 points hold Pallas to the buffers its design keeps instead, + 64 MiB: one
        # float32 [N, D] d_hidden accumulator per TensorCore (every backward keeps one) and
        # `hidden^T` (N D, for the plain d_lm_head dot; libtpu 0.0.42 (jax 0.10) places it in the
        # d_hidden output's buffer, 0.0.48 (jax 0.11) in temp). `benchmarks/logprob.py --tpu-aot`
        # compares both paths at every point.
        bound, what = (chip.cores + 1) * n * d * 4, f"{chip.cores} f32 [N, D] + hidden^T"
    else:
        chunked = aot.token_logprobs_report(mesh, impl="chunked", **kw)
        bound, what = chunked.temp_bytes, f"chunked ({chunked.compile_seconds:.1f} s)"
    print(f"\n{topology} D {d} V {v} {dtype} bwd blocks {plan.bn}x{plan.bv}x{plan.bd}: temp "
          f"pallas {pallas.temp_bytes / MIB:.1f} MiB ({pallas.compile_seconds:.1f} s), {what} {bound / MIB:.1f} MiB")
    assert pallas.temp_bytes <= bound + 64 * MIB


def test_pallas_forward_only_compiles_f32_head_next_to_bf16_hidden():
    """bf16 compute with float32 parameters: the head is cast to bf16 once before the kernel (as
    the model's own bf16 forward casts it), so working memory is that copy, D·V·2 bytes, plus at
    most 64 MiB; no float32 logits block of N·V."""
    n, d, v = 4096, 2048, 151936
    rep = aot.token_logprobs_report(aot.tpu_mesh("v5e:2x2", (1, 1, 1)), n=n, d=d, v=v,
                                    impl="pallas", head_dtype="float32", backward=False)
    head_copy = d * v * 2
    assert rep.temp_bytes <= head_copy + 64 * MIB, (rep.temp_bytes / MIB, head_copy / MIB)
    assert rep.temp_bytes < n * v * 4  # far below one float32 logits matrix (2.3 GiB)


def test_slot_engine_decode_splits_slot_groups_on_v5e_2x4():
    """The slot engine's decode on 8 chips (`data` 8: a slot group per chip, weights replicated):
    the only collective is the decode loop's "any group still running" all-reduce - no cache
    moves between chips; each chip holds 1/8 of the KV caches, and its working memory is no more
    than the one-group program's on one chip."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_rm.models.config import ModelConfig
    from jaxrl_rm.models.transformer import Transformer
    from jaxrl_rm.parallel.rules import param_shardings
    from jaxrl_rm.rollout import step as step_mod

    cfg = ModelConfig.for_family("qwen2", vocab_size=32000, hidden_size=896, intermediate_size=4864,
                                 num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2)
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    spec = step_mod.EngineSpec(num_slots=64, num_prompt_slots=8, prompt_len=512, gen_len=1024, prefill_rows=4,
                               top_k=0, use_top_p=False, greedy=False, num_stop_slots=2, pad_id=0)

    def report(groups, shape):
        mesh = aot.tpu_mesh("v5e:2x4", shape)
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                             param_shardings(state, mesh))
        fn, args, kwargs = step_mod.decode_groups_program(model, state, spec, groups, mesh)
        kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((args[3].prompt_cache, args[3].completion_cache)))
        weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        return aot.compile_report(fn, *args, **kwargs), kv, weights

    one, kv1, weights = report(1, (1, 1, 1))
    eight, kv8, _ = report(8, (8, 1, 1))
    print(f"\nslot engine decode: per-chip temp 1 group {one.temp_bytes / MIB:.1f} MiB, 8 groups on 8 chips "
          f"{eight.temp_bytes / MIB:.1f} MiB; KV {kv8 / MIB:.0f} MiB in all; collectives {eight.collectives}")
    assert kv8 == 8 * kv1
    assert eight.collectives == {"all-reduce": 1}, eight.collectives
    assert eight.argument_bytes <= weights + kv8 / 8 + MIB, (eight.argument_bytes, weights, kv8)
    assert eight.temp_bytes <= one.temp_bytes * 1.05, (one.temp_bytes, eight.temp_bytes)

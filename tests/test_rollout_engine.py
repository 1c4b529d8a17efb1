"""Slot engine (`jaxrl_rm.rollout`): the same samples as `sampling.generate` for the same seed,
HF greedy parity, sampler log-probs = teacher-forced log-probs, rows inserted mid-flight (more
requests than slots, per-request budgets, stop tokens), independence from slot count / host
threads / arrival order, no recompilation on insertion, and the prompt KV stored once per prompt.
Both layer layouts (unrolled, scanned) run through the engine."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from conftest import random_prompts
from jaxrl_rm.rollout import Request, SlotEngine
from jaxrl_rm.rollout import step as step_mod
from jaxrl_rm.sampling import generate, teacher_forced_logprobs

torch = pytest.importorskip("torch")

VOCAB = 97
LENS = [5, 12, 1, 9, 7, 3]
# One engine shape serves most tests (one compile of prefill + decode per layout).
SHAPE = dict(max_prompt_len=16, max_new_tokens=24)


def _prompts(seed=0, lens=LENS):
    return random_prompts(seed, lens, VOCAB)


def _np(res):
    return {k: np.asarray(getattr(res, k)) for k in ("tokens", "mask", "logprobs", "lengths", "unfiltered_logprobs")}


# --- equality with the static sampler ---------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_samples_equal_generate_with_midflight_inserts(scan_layers, tiny_models):
    """18 samples through 5 slots (rows inserted as others stop), 2 prompt slots, a stop token and
    per-request budgets: every row equals `generate`'s row for the same seed, until its end."""
    _, model, _ = tiny_models("qwen3", scan_layers)
    prompts = _prompts()
    free = generate(model, prompts, num_samples=3, max_new_tokens=24, temperature=0.8, seed=3,
                    return_unfiltered_logprobs=True)
    stop = int(np.asarray(free.tokens)[0, 4])  # a token row 0 emits at step 4
    ref = generate(model, prompts, num_samples=3, max_new_tokens=24, temperature=0.8, seed=3, stop_token_ids=[stop],
                   return_unfiltered_logprobs=True)
    budgets = [24, 7, 24, 11, 24, 2]
    engine = SlotEngine(model, num_slots=5, num_prompt_slots=2, temperature=0.8, stop_token_ids=[stop],
                        steps_per_sync=4, host_threads=1, **SHAPE)
    res = engine.run([Request(p, num_samples=3, max_new_tokens=b) for p, b in zip(prompts, budgets)], seed=3)
    r, e = _np(ref), _np(res)
    assert e["tokens"].shape == (18, 24)
    limit = np.repeat(budgets, 3)
    expect_len = np.minimum(r["lengths"], limit)
    np.testing.assert_array_equal(e["lengths"], expect_len)
    for i in range(18):
        n = expect_len[i]
        np.testing.assert_array_equal(e["tokens"][i, :n], r["tokens"][i, :n])
        np.testing.assert_allclose(e["logprobs"][i, :n], r["logprobs"][i, :n], atol=2e-5, rtol=0)
        assert (e["tokens"][i, n:] == 0).all() and (e["logprobs"][i, n:] == 0).all()
        stopped = n > 0 and e["tokens"][i, n - 1] == stop
        assert res.finish_reason[i] == ("stop" if stopped else "length")
    assert res.finish_reason[0] == "stop" and e["lengths"][0] <= 5
    np.testing.assert_array_equal(np.asarray(res.prompt_tokens), np.asarray(ref.prompt_tokens))
    np.testing.assert_array_equal(np.asarray(res.prompt_lengths), np.asarray(ref.prompt_lengths))
    st = engine.stats
    assert st.useful_tokens == expect_len.sum() and st.prompts_prefilled == 6
    assert 0 < st.occupancy <= 1 and st.syncs > 1


def _hf_greedy(torch_model, prompts, max_new, eos):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    att = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        att[i, width - len(p):] = 1
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(att), do_sample=False,
                                   max_new_tokens=max_new, pad_token_id=0, eos_token_id=eos)
    return out[:, width:].numpy()


@pytest.mark.parametrize("family,scan_layers", [("llama", False), ("qwen2", True)])
def test_greedy_matches_transformers(family, scan_layers, tiny_models):
    """Greedy through 2 slots for 6 prompts (4 inserted mid-flight), with a stop token the model
    emits: the tokens, lengths and padding are transformers' and `generate`'s."""
    torch_model, model, _ = tiny_models(family, scan_layers)
    prompts = _prompts(1)
    free = _hf_greedy(torch_model, prompts, 24, eos=None)
    stop = int(free[0, 3])
    expected = _hf_greedy(torch_model, prompts, 24, eos=stop)
    engine = SlotEngine(model, num_slots=2, greedy=True, stop_token_ids=[stop], steps_per_sync=3, host_threads=1,
                        **SHAPE)
    res = engine.generate(prompts)
    tokens = np.asarray(res.tokens)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    hf_len = np.array([next((j + 1 for j, t in enumerate(row) if t == stop), 24) for row in expected])
    np.testing.assert_array_equal(np.asarray(res.lengths), hf_len)
    assert (tokens[np.arange(24)[None, :] >= hf_len[:, None]] == 0).all()
    assert res.finish_reason[0] == "stop" and hf_len[0] <= 4
    ref = generate(model, prompts, max_new_tokens=24, greedy=True, stop_token_ids=[stop])
    np.testing.assert_array_equal(tokens, np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(res.logprobs), np.asarray(ref.logprobs), atol=2e-5, rtol=0)


# --- log-probs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_logprobs_equal_teacher_forced(scan_layers, tiny_models):
    _, model, _ = tiny_models("qwen3", scan_layers)
    engine = SlotEngine(model, num_slots=5, num_prompt_slots=2, temperature=0.7, steps_per_sync=4, host_threads=1,
                        **SHAPE)
    res = engine.generate(_prompts(2), num_samples=3, seed=4)
    tf = teacher_forced_logprobs(model, res, temperature=0.7)
    np.testing.assert_allclose(np.asarray(res.logprobs), np.asarray(tf), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(res.unfiltered_logprobs), np.asarray(res.logprobs))
    assert np.all(np.asarray(res.logprobs)[np.asarray(res.mask)] < 0)


def test_filtered_logprobs_and_unfiltered(tiny_models):
    """top-k + top-p: sampled log-probs are the renormalised filtered ones (teacher-forced with the
    same filters); `unfiltered_logprobs` are log_softmax(logits / T), what a trainer recomputes."""
    _, model, _ = tiny_models("qwen3")
    engine = SlotEngine(model, num_slots=4, temperature=1.3, top_k=5, top_p=0.8, host_threads=1, **SHAPE)
    res = engine.generate(_prompts(3, [4, 9, 2]), num_samples=2, seed=1)
    tf = teacher_forced_logprobs(model, res, temperature=1.3, top_k=5, top_p=0.8)
    assert np.isfinite(np.asarray(tf)).all()
    np.testing.assert_allclose(np.asarray(res.logprobs), np.asarray(tf), atol=1e-4, rtol=0)
    base = teacher_forced_logprobs(model, res, temperature=1.3)
    np.testing.assert_allclose(np.asarray(res.unfiltered_logprobs), np.asarray(base), atol=1e-4, rtol=0)
    ref = generate(model, _prompts(3, [4, 9, 2]), num_samples=2, max_new_tokens=24, temperature=1.3, top_k=5,
                   top_p=0.8, seed=1)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ref.tokens))


# --- determinism ------------------------------------------------------------------------------------
def test_independent_of_slot_count_threads_and_arrival_order(tiny_models):
    """Each sample's draws are fixed by (seed, row, step): 3 or 7 slots, 1 or 2 host threads,
    and the requests in reverse order (explicit rows) give the same rows."""
    _, model, _ = tiny_models("qwen3")
    prompts = _prompts(5, [3, 7, 1, 12, 5, 9, 2, 4])
    reqs = [Request(p, num_samples=2, row=2 * i, max_new_tokens=6 + 2 * i) for i, p in enumerate(prompts)]
    kw = dict(temperature=1.0, steps_per_sync=5, **SHAPE)
    a = SlotEngine(model, num_slots=3, host_threads=1, **kw).run(reqs, seed=9)
    b = SlotEngine(model, num_slots=8, num_prompt_slots=3, host_threads=2, **kw).run(reqs[::-1], seed=9)
    order = np.concatenate([[2 * (7 - i), 2 * (7 - i) + 1] for i in range(8)])  # b's row k -> a's row
    ea, eb = _np(a), _np(b)
    for k in ("tokens", "lengths", "mask"):
        np.testing.assert_array_equal(eb[k], ea[k][order])
    np.testing.assert_allclose(eb["logprobs"], ea["logprobs"][order], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(ea["lengths"], np.repeat(6 + 2 * np.arange(8), 2))
    c = SlotEngine(model, num_slots=3, host_threads=1, **kw).run(reqs, seed=10)
    assert (np.asarray(c.tokens) != ea["tokens"]).any()


def test_no_recompilation_when_requests_are_inserted(tiny_models):
    """After `warmup()` (prefill buckets, decode and compaction at each slot level), runs with
    other request counts, prompt lengths, budgets, seeds and sample counts trace nothing new; the
    tail compaction (8 -> 4 -> 2 slots) leaves the samples those of `generate`."""
    _, model, _ = tiny_models("qwen3")
    engine = SlotEngine(model, num_slots=8, num_prompt_slots=4, temperature=1.0, stop_token_ids=[5, 6],
                        steps_per_sync=3, host_threads=1, min_compact_slots=2, **SHAPE)
    assert [lv.num_slots for lv in engine.levels] == [8, 4, 2] and engine.prefill_buckets == (1, 2, 4)
    engine.warmup()
    before = dict(step_mod.TRACE_COUNT)
    reqs = [Request(p, num_samples=1 + i % 3, max_new_tokens=3 + 4 * i) for i, p in
            enumerate(_prompts(7, [16, 1, 9, 4, 6, 2]))]
    res = engine.run(reqs, seed=4)
    assert engine.stats.compactions >= 1 and engine.stats.syncs > 1
    engine.generate(_prompts(8, [2] * 9), num_samples=1, seed=5)
    engine.generate(_prompts(9, [3, 14]), num_samples=3, seed=6)
    assert step_mod.TRACE_COUNT == before
    # Request i's sample j has row id 3i + j: generate's row for 3 samples per prompt.
    ref = generate(model, [r.prompt_ids for r in reqs], num_samples=3, max_new_tokens=24, temperature=1.0, seed=4,
                   stop_token_ids=[5, 6])
    explicit = [dataclasses.replace(r, row=3 * i) for i, r in enumerate(reqs)]
    again = engine.run(explicit, seed=4)
    assert engine.stats.compactions >= 1
    rows = np.concatenate([3 * i + np.arange(r.num_samples) for i, r in enumerate(reqs)])
    limits = np.concatenate([[r.max_new_tokens] * r.num_samples for r in reqs])
    n = np.minimum(np.asarray(ref.lengths)[rows], limits)
    np.testing.assert_array_equal(np.asarray(again.lengths), n)
    got, want = np.asarray(again.tokens), np.asarray(ref.tokens)[rows]
    for k in range(len(rows)):
        np.testing.assert_array_equal(got[k, :n[k]], want[k, :n[k]])
    assert res.num_rows == sum(r.num_samples for r in reqs)


# --- memory -----------------------------------------------------------------------------------------
def test_prompt_cache_stored_once_per_prompt(tiny_models):
    """G samples read one copy of their prompt's K/V: the prompt cache has a row per prompt slot
    (`num_slots / G`), the completion cache a row per sample slot; identical prompts are prefilled
    once."""
    _, model, _ = tiny_models("qwen3")
    cfg = model.config
    g, slots = 4, 8
    engine = SlotEngine(model, num_slots=slots, num_prompt_slots=slots // g, temperature=1.0, host_threads=1,
                        **SHAPE)
    state = step_mod.init_state(model, engine.spec)
    pk, _ = state.prompt_cache[0]
    ck, _ = state.completion_cache[0]
    assert pk.shape == (slots // g, cfg.num_key_value_heads, 16, cfg.dim_per_head)
    assert ck.shape == (slots, cfg.num_key_value_heads, 24, cfg.dim_per_head)
    stored = sum(x.nbytes for x in jax.tree.leaves(state.prompt_cache))
    sizes = engine.cache_bytes()
    assert sizes["prompt"] == stored
    assert sizes["completion"] == sum(x.nbytes for x in jax.tree.leaves(state.completion_cache))
    assert sizes["repeated_prompt"] == g * sizes["prompt"]
    prompts = _prompts(9, [6, 11])
    res = engine.generate(prompts, num_samples=g, seed=2)
    assert engine.stats.prompts_prefilled == 2
    ref = generate(model, prompts, num_samples=g, max_new_tokens=24, temperature=1.0, seed=2)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ref.tokens))
    # The same prompt in two requests (e.g. a judge template) occupies one prompt slot.
    same = engine.run([Request(prompts[0], num_samples=2), Request(prompts[0], num_samples=2)], seed=2)
    assert engine.stats.prompts_prefilled == 1 and engine.stats.prompts_reused == 1
    np.testing.assert_array_equal(np.asarray(same.tokens), np.asarray(res.tokens)[:4])


def test_decode_program_holds_one_layer_of_gathered_prompt_kv(tiny_models):
    """XLA's memory plan of the decode step: its temporaries stay below the size of a per-sample
    copy of the prompt K/V (the per-layer gathers of the shared prompt rows are neither hoisted
    out of the loop nor all live at once)."""
    from flax import nnx

    from jaxrl_rm.sampling.sampler import _StaticGraph

    _, model, _ = tiny_models("qwen3")
    engine = SlotEngine(model, num_slots=16, num_prompt_slots=1, max_prompt_len=128, max_new_tokens=8,
                        temperature=1.0, host_threads=1, compact=False)
    state = step_mod.init_state(model, engine.spec)
    graphdef, weights = nnx.split(model)
    slots = step_mod.empty_slots((16,))
    compiled = step_mod.decode_jit.lower(_StaticGraph(graphdef, model.config), weights, None, state, slots,
                                         engine._stops, engine._temperature, engine._top_p, np.int32(1), np.int32(1),
                                         spec=engine.spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < engine.cache_bytes()["repeated_prompt"], (temp, engine.cache_bytes())


def test_bad_requests_are_clear_errors(tiny_models):
    _, model, _ = tiny_models("qwen3")
    engine = SlotEngine(model, num_slots=2, temperature=1.0, host_threads=1, **SHAPE)
    with pytest.raises(ValueError, match=r"requests\[1\] has 17 prompt tokens > the engine's max_prompt_len=16"):
        engine.run([Request([1, 2]), Request(list(range(3, 20)))])
    with pytest.raises(ValueError, match=r"requests\[0\].max_new_tokens must be in \[1, 24\]"):
        engine.run([Request([1, 2], max_new_tokens=25)])
    with pytest.raises(ValueError, match="outside"):
        engine.run([Request([1, VOCAB])])
    with pytest.raises(TypeError, match="string"):
        engine.run([Request("hello")])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SlotEngine(model, num_slots=2, max_prompt_len=200, max_new_tokens=100)

"""Sampler: HF greedy parity, sampler log-probs = teacher-forced log-probs, temperature / top-k /
top-p against their definitions, seeds, stop tokens, prompt limits, compile caching, text helpers.
HF parity and log-prob tests also run with scanned layers (a stacked `[L, ...]` KV cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_prompts
from jaxrl_rm.models import hf
from jaxrl_rm.sampling import (bucket_length, filtered_logits, generate, generate_text, sample_tokens,
                               teacher_forced_logprobs, token_logprobs, top_p_keep)
from jaxrl_rm.sampling import sampler as sampler_mod

torch = pytest.importorskip("torch")

VOCAB = 97
PROMPT_LENS = [5, 12, 1, 9]
# One compiled sampler serves most qwen3 tests: 4 prompts, <= 16 tokens, 3 samples, <= 16 new tokens.
SAMPLE = dict(num_samples=3, max_new_tokens=10, temperature=1.0, return_unfiltered_logprobs=True)


def _prompts(seed=0, lens=PROMPT_LENS):
    return random_prompts(seed, lens, VOCAB)


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


# --- HF parity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,scan_layers", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_greedy_matches_transformers(family, scan_layers, tiny_models):
    torch_model, model, _ = tiny_models(family, scan_layers)
    prompts = _prompts()
    # 40 new tokens: a 64-slot generation bucket, decoded in two phases (the cache grows between them)
    assert len(sampler_mod.decode_windows(16, bucket_length(40))) == 2
    expected = _hf_greedy(torch_model, prompts, 40, eos=2)
    res = generate(model, prompts, max_new_tokens=40, greedy=True, stop_token_ids=[2])
    tokens = np.asarray(res.tokens)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == 0).all()

    # Stop on a token the model actually emits: HF stops that row at the same place and pads.
    stop = int(expected[0, 3])
    expected = _hf_greedy(torch_model, prompts, 40, eos=stop)
    res = generate(model, prompts, max_new_tokens=40, greedy=True, stop_token_ids=[stop])
    tokens = np.asarray(res.tokens)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    hf_len = np.array([next((j + 1 for j, t in enumerate(row) if t == stop), 40) for row in expected])
    np.testing.assert_array_equal(np.asarray(res.lengths), hf_len)
    assert res.finish_reason[0] == "stop" and hf_len[0] <= 4


# --- log-probs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_logprobs_equal_teacher_forced(scan_layers, tiny_models):
    _, model, _ = tiny_models("qwen3", scan_layers)
    res = generate(model, _prompts(1), **{**SAMPLE, "temperature": 0.7, "max_new_tokens": 40}, seed=3)
    assert res.tokens.shape == (12, 40) and res.logprobs.dtype == jnp.float32
    tf = teacher_forced_logprobs(model, res, temperature=0.7)
    np.testing.assert_allclose(np.asarray(res.logprobs), np.asarray(tf), atol=1e-4, rtol=0)
    # no filter: the unfiltered log-probs are the sampled distribution's, at the same temperature
    np.testing.assert_array_equal(np.asarray(res.unfiltered_logprobs), np.asarray(res.logprobs))
    assert np.all(np.asarray(res.logprobs)[np.asarray(res.mask)] < 0)


def test_topk_topp_end_to_end_consistent(tiny_models):
    """Filtered sampling: every token lies in the teacher-forced filtered support, and the sampler's
    log-prob is the renormalised filtered log-prob."""
    _, model, _ = tiny_models("qwen3")
    res = generate(model, _prompts(2), num_samples=4, max_new_tokens=8, temperature=1.3, top_k=5, top_p=0.8,
                   seed=1)
    tf = teacher_forced_logprobs(model, res, temperature=1.3, top_k=5, top_p=0.8)
    assert np.isfinite(np.asarray(tf)).all()  # -inf would mean a token outside top-k / top-p
    np.testing.assert_allclose(np.asarray(res.logprobs), np.asarray(tf), atol=1e-4, rtol=0)


@pytest.mark.parametrize("filters", [dict(top_p=0.7), dict(top_k=5), dict(top_k=5, top_p=0.8)])
def test_unfiltered_logprobs_are_teacher_forced_at_the_sampling_temperature(tiny_models, filters):
    """With top-p / top-k on, `unfiltered_logprobs` is log_softmax(logits / T) of the sampled token
    before filtering - what a trainer recomputes (GRPO's TIS and sampler_logp_gap use it) - while
    `logprobs` also holds the log of the kept mass."""
    _, model, _ = tiny_models("qwen3")
    res = generate(model, _prompts(2), num_samples=4, max_new_tokens=8, temperature=1.3, seed=1,
                   return_unfiltered_logprobs=True, **filters)
    mask = np.asarray(res.mask)
    tf = np.asarray(teacher_forced_logprobs(model, res, temperature=1.3))  # no filter
    np.testing.assert_allclose(np.asarray(res.unfiltered_logprobs), tf, atol=1e-4, rtol=0)
    assert (np.asarray(res.unfiltered_logprobs)[~mask] == 0).all()
    nucleus = np.asarray(res.logprobs) - np.asarray(res.unfiltered_logprobs)  # -log(kept mass) >= 0
    assert (nucleus[mask] > -1e-5).all() and nucleus[mask].max() > 0.05


def test_trainer_logprobs_match_sampler_bf16_compute_f32_params(tiny_models):
    """bf16 compute with float32 parameters: the sampler's logits use the head cast to bf16 (default
    precision, float32 accumulation). The trainer's log-probs (`grpo.completion_logprobs` ->
    `kernels.token_logprobs`, jitted as in the update step) must use the same head: an uncast float32
    head (a float32 HIGHEST matmul) lands ~1e-3 away, a gap that is not the policy's."""
    from flax import nnx

    from jaxrl_rm.train.grpo import completion_hidden, completion_logprobs

    _, _, path = tiny_models("qwen2")  # untied float32 lm_head
    model = hf.load_model(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert model.lm_head_weight().dtype == jnp.float32
    res = generate(model, _prompts(4), num_samples=4, max_new_tokens=16, temperature=0.7, seed=3)
    ids, attn = res.sequences()
    p = int(res.prompt_tokens.shape[1])
    graphdef, state = nnx.split(model)

    @jax.jit
    def trainer(state, ids, attn, tokens):
        m = nnx.merge(graphdef, state)
        logp = completion_logprobs(m, {"input_ids": ids, "attention_mask": attn, "completion": tokens},
                                   prompt_len=p, temperature=0.7)
        # what an uncast float32 head computes: log_softmax(h @ W / T) in float32 at HIGHEST
        h = completion_hidden(m, ids, attn, p).astype(jnp.float32)
        z = jnp.dot(h, m.lm_head_weight(), precision=jax.lax.Precision.HIGHEST) / 0.7
        f32_head = jnp.take_along_axis(jax.nn.log_softmax(z, -1), tokens[..., None], -1)[..., 0]
        return logp, f32_head

    logp, f32_head = trainer(state, ids, attn, res.tokens)
    mask = np.asarray(res.mask)
    gap = np.abs(np.asarray(logp) - np.asarray(res.logprobs))[mask]
    f32_gap = np.abs(np.asarray(f32_head) - np.asarray(res.logprobs))[mask]
    assert gap.max() < 1e-5, gap.max()
    assert f32_gap.max() > 100 * gap.max()  # the bound above tells the two heads apart


# --- the distribution against its definition --------------------------------------------------------
def _draws(logits, n, **kw):
    """n draws per row of logits [R, V] -> tokens [n, R], logp [n, R] (fast path), and the
    reference log-probs of the drawn tokens [n, R]."""
    r = logits.shape[0]
    u = jax.random.uniform(jax.random.key(0), (n * r,))
    big = jnp.tile(logits, (n, 1))
    tok, lp = jax.jit(lambda x, u: sample_tokens(x, u, **kw))(big, u)
    ref_kw = {k: v for k, v in kw.items() if k in ("temperature", "top_k", "top_p")}
    ref = jax.jit(lambda x, t: token_logprobs(x, t, **ref_kw))(big, tok)
    return np.asarray(tok).reshape(n, r), np.asarray(lp).reshape(n, r), np.asarray(ref).reshape(n, r)


def _logits(seed=0, rows=2, v=300):
    return 3.0 * jax.random.normal(jax.random.key(seed), (rows, v))


def test_temperature_frequencies_and_logprobs():
    logits = _logits(v=40)
    n = 20000
    tok, lp, ref = _draws(logits, n, temperature=2.0)
    probs = np.asarray(jax.nn.softmax(logits / 2.0, -1))
    for r in range(logits.shape[0]):
        freq = np.bincount(tok[:, r], minlength=40) / n
        assert np.abs(freq - probs[r]).max() < 4 * np.sqrt(probs[r].max() / n) + 1e-3
    np.testing.assert_allclose(lp, ref, atol=1e-5)
    np.testing.assert_allclose(ref, np.log(probs[np.arange(2)[None], tok]), atol=1e-5)


def test_top_k_never_outside_and_renormalised():
    logits = _logits(1)
    k = 7
    tok, lp, ref = _draws(logits, 5000, temperature=1.5, top_k=k)
    top = np.asarray(jax.lax.top_k(logits, k)[1])
    for r in range(logits.shape[0]):
        assert set(np.unique(tok[:, r])) <= set(top[r].tolist())
        probs = np.asarray(jax.nn.softmax(jnp.asarray(filtered_logits(logits, temperature=1.5, top_k=k))[r]))
        freq = np.bincount(tok[:, r], minlength=probs.size) / tok.shape[0]
        assert np.abs(freq - probs).max() < 0.03
    np.testing.assert_allclose(lp, ref, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_mask_is_the_smallest_prefix_reaching_p(p):
    logits = _logits(2, rows=6, v=500)
    keep = np.asarray(top_p_keep(logits, jnp.float32(p)))
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    for r in range(probs.shape[0]):
        order = np.argsort(-probs[r])
        before = np.cumsum(probs[r][order]) - probs[r][order]
        expected = np.zeros_like(keep[r])
        expected[order[before < p]] = True
        np.testing.assert_array_equal(keep[r], expected)
        assert probs[r][keep[r]].sum() >= p - 1e-6  # mass reached ...
        assert probs[r][keep[r]].sum() - probs[r][keep[r]].min() < p + 1e-6  # ... by the smallest such set
    ref = np.isfinite(np.asarray(filtered_logits(logits, top_p=p)))
    np.testing.assert_array_equal(keep, ref)


def test_top_p_sampling_support_and_mass():
    logits = _logits(3, v=200)
    tok, lp, ref = _draws(logits, 2000, top_p=0.6, use_top_p=True)
    allowed = np.asarray(top_p_keep(logits, jnp.float32(0.6)))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for r in range(logits.shape[0]):
        assert allowed[r][tok[:, r]].all()
        kept = probs[r] * allowed[r] / (probs[r] * allowed[r]).sum()
        freq = np.bincount(tok[:, r], minlength=probs.shape[1]) / tok.shape[0]
        assert np.abs(freq - kept).max() < 0.04
    np.testing.assert_allclose(lp, ref, atol=1e-5)
    # top-k then top-p, both through the fast path
    tok, lp, ref = _draws(logits, 1000, top_k=20, top_p=0.6, use_top_p=True)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(lp, ref, atol=1e-5)


def test_excluded_tokens_never_drawn_even_at_u_near_one():
    logits = jnp.array([[0.0, 1.0, -jnp.inf, 2.0] + [-jnp.inf] * 300])
    u = jnp.array([0.0, 0.5, 1.0 - 2 ** -24, np.nextafter(np.float32(1), np.float32(0))])
    tok, lp = jax.jit(sample_tokens)(jnp.tile(logits, (4, 1)), u)
    assert set(np.asarray(tok).tolist()) <= {0, 1, 3} and int(tok[-1]) == 3
    assert np.isfinite(np.asarray(lp)).all()
    tok, _ = jax.jit(lambda x, u: sample_tokens(x, u, greedy=True))(logits, jnp.zeros(1))
    assert int(tok[0]) == 3


# --- seeds, stops, limits -------------------------------------------------------------------------
def test_seeds_and_rows(tiny_models):
    _, model, _ = tiny_models("qwen3")
    prompts = _prompts(4)
    a = generate(model, prompts, **SAMPLE, seed=7)
    b = generate(model, prompts, **SAMPLE, seed=7)
    c = generate(model, prompts, **SAMPLE, seed=8)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    toks = np.asarray(a.tokens).reshape(len(prompts), 3, -1)
    for i in range(len(prompts)):  # the samples of one prompt differ from each other
        assert len({tuple(row) for row in toks[i]}) == 3


def test_stop_tokens_mask_lengths(tiny_models):
    _, model, _ = tiny_models("qwen3")
    prompts = _prompts(5)
    free = generate(model, prompts, **SAMPLE, seed=11)
    toks = np.asarray(free.tokens)
    stop = int(toks[0, 2])  # a token row 0 emits at step 2
    res = generate(model, prompts, **SAMPLE, seed=11, stop_token_ids=[stop, 96])
    t, m, lp, n = (np.asarray(x) for x in (res.tokens, res.mask, res.logprobs, res.lengths))
    for i in range(t.shape[0]):
        hits = [j for j, x in enumerate(toks[i]) if x in (stop, 96)]
        expect = hits[0] + 1 if hits else 10
        assert n[i] == expect and m[i].sum() == expect and m[i, :expect].all()
        np.testing.assert_array_equal(t[i, :expect], toks[i, :expect])  # same draws until the stop
        assert (t[i, expect:] == 0).all() and (lp[i, expect:] == 0).all()
        assert res.finish_reason[i] == ("stop" if hits else "length")
    assert n[0] <= 3 and res.finish_reason[0] == "stop"


def test_prompt_limits_and_padded_input(tiny_models):
    _, model, _ = tiny_models("qwen3")
    prompts = _prompts(6)
    with pytest.raises(ValueError, match=r"prompt 1 has 12 tokens > max_prompt_len=8.*truncate_prompt='left'"):
        generate(model, prompts, **SAMPLE, max_prompt_len=8)
    cut = generate(model, prompts, **SAMPLE, max_prompt_len=8, truncate_prompt="left")
    manual = generate(model, [p[-8:] for p in prompts], **SAMPLE)
    np.testing.assert_array_equal(np.asarray(cut.tokens), np.asarray(manual.tokens))
    assert np.asarray(cut.prompt_lengths).max() == 8
    # a right-padded [B, L] batch with lengths is the same as the ragged list
    padded = np.zeros((4, 12), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    again = generate(model, padded, prompt_lengths=[len(p) for p in prompts], padding_side="right", **SAMPLE)
    full = generate(model, prompts, **SAMPLE)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(full.tokens))
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 2, VOCAB]], **SAMPLE)


def test_compiles_once_per_bucket(tiny_models):
    _, model, _ = tiny_models("qwen3")
    generate(model, _prompts(7, [3, 9, 4]), **SAMPLE, seed=0)
    before = sampler_mod.TRACE_COUNT["n"]
    # other prompt counts / lengths, budgets, temperatures, seeds and stop ids within the same buckets
    generate(model, _prompts(8, [15, 2, 7, 1]), **{**SAMPLE, "max_new_tokens": 14, "temperature": 0.5}, seed=1,
             stop_token_ids=[3])
    generate(model, _prompts(9, [16, 16, 16]), **{**SAMPLE, "max_new_tokens": 16}, seed=2)
    assert sampler_mod.TRACE_COUNT["n"] == before
    assert bucket_length(17) == 32 and bucket_length(1025) == 2048


def test_text_helpers_apply_chat_template(tmp_path):
    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.models.config import ModelConfig
    from jaxrl_rm.models.transformer import Transformer
    from flax import nnx

    tok = build_char_tokenizer()
    model = Transformer(ModelConfig.for_family("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
                        rngs=nnx.Rngs(0))
    out = generate_text(model, tok, ["hi", [{"role": "user", "content": "2+2?"}]], chat_template=True,
                        max_new_tokens=6, num_samples=2, temperature=1.0, seed=0)
    assert out.prompt_texts[0] == "<|user|>hi<|end|><|assistant|>"
    ids = np.asarray(out.result.prompt_tokens)[0]
    assert tok.decode(ids[ids != 0].tolist()) == out.prompt_texts[0]
    assert len(out.texts) == 4 and [len(g) for g in out.grouped()] == [2, 2]
    assert out.texts[0] == tok.decode(out.result.completions()[0], skip_special_tokens=True)
    eos = tok.eos_token_id
    for row, n, why in zip(out.result.completions(), np.asarray(out.result.lengths), out.result.finish_reason):
        assert (why == "stop") == (row[-1] == eos) and len(row) == n


def test_host_thread_shards_do_not_change_samples(tiny_models):
    """On CPU the rows may be decoded as concurrent shards; each row's draws depend only on
    (seed, row, step), so the result is the same however the batch is split."""
    _, model, _ = tiny_models("qwen3")
    prompts = _prompts(10, [3, 7, 1, 12] * 4)
    one = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=5, host_threads=1)
    two = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=5, host_threads=2)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(two.logprobs), atol=1e-6)
    np.testing.assert_array_equal(one.finish_reason, two.finish_reason)

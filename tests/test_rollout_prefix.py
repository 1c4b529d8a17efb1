"""Shared prefixes in the slot engine: prompts of a run that share a long prefix (a judge's
template + question + reference, followed by different responses) prefill it once into a prefix
slot and read that one copy. Samples and log-probs are those of the engine without sharing and of
`sampling.generate` (both layer layouts, fewer prefix slots than prefixes, rows inserted
mid-flight); int8 caches stay within rounding; the judges sample through it."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.transformer import Transformer
from jaxrl_rm.rollout import SlotEngine
from jaxrl_rm.rollout import step as step_mod
from jaxrl_rm.rollout.requests import shared_prefix_lengths
from jaxrl_rm.sampling import generate

CFG = ModelConfig.for_family("qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
KW = dict(max_prompt_len=40, max_new_tokens=12, temperature=1.0, steps_per_sync=4)


def _judge_like_prompts():
    """3 questions x 4 responses after one 20-token template (28 shared tokens per question), and
    one prompt that shares nothing."""
    rng = np.random.default_rng(0)
    template = rng.integers(1, 97, size=20).tolist()
    prompts = []
    for _ in range(3):
        question = rng.integers(1, 97, size=8).tolist()
        for _ in range(4):
            prompts.append(template + question + rng.integers(1, 97, size=int(rng.integers(2, 9))).tolist())
    prompts.append(rng.integers(1, 97, size=12).tolist())
    return prompts


def test_shared_prefix_lengths():
    p = lambda *xs: np.asarray(xs, np.int32)
    prompts = [p(1, 2, 3, 4, 5, 6), p(1, 2, 3, 4, 9), p(1, 2, 3, 4, 5, 7, 8), p(7, 7, 7), p(1, 2, 3, 4, 5, 6),
               p(1, 2)]
    # sorted: (1 2), (1 2 3 4 5 6), (1 2 3 4 5 7 8), (1 2 3 4 9), (7 7 7). The three long ones share 4
    # tokens (saving 2 x 4) - better than two of them sharing 5 (5), or all four sharing (1 2) (3 x 1).
    # An identical prompt is one distinct prompt (it reuses the prompt slot); the last token of a
    # prompt never goes to its prefix.
    np.testing.assert_array_equal(shared_prefix_lengths(prompts, max_len=99, min_len=1), [4, 4, 4, 0, 4, 0])
    np.testing.assert_array_equal(shared_prefix_lengths(prompts, max_len=3, min_len=1), [3, 3, 3, 0, 3, 0])
    np.testing.assert_array_equal(shared_prefix_lengths(prompts, max_len=99, min_len=5), [5, 0, 5, 0, 5, 0])
    np.testing.assert_array_equal(shared_prefix_lengths([p(1, 2, 3, 4, 5)] * 3, max_len=99, min_len=1), [0, 0, 0])
    ks = shared_prefix_lengths([np.asarray(x, np.int32) for x in _judge_like_prompts()], max_len=32, min_len=16)
    assert set(ks[:12]) == {28} and ks[12] == 0


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_shared_prefixes_give_the_same_samples(scan_layers):
    """Three prefixes through two prefix slots (the third waits for one to free), 26 samples
    through 8 slots: the rows of the engine without sharing and of `generate`, with the prefix
    prefilled once per question."""
    prompts = _judge_like_prompts()
    model = Transformer(CFG, rngs=nnx.Rngs(0), scan_layers=scan_layers)
    plain = SlotEngine(model, num_slots=8, host_threads=1, **KW)
    a = plain.generate(prompts, num_samples=2, seed=1)
    shared = SlotEngine(model, num_slots=8, host_threads=1, max_prefix_len=32, num_prefix_slots=2, **KW)
    b = shared.generate(prompts, num_samples=2, seed=1)
    ref = generate(model, prompts, num_samples=2, max_new_tokens=12, temperature=1.0, seed=1)
    for res in (a, ref):
        np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(res.tokens))
        np.testing.assert_array_equal(np.asarray(b.lengths), np.asarray(res.lengths))
        np.testing.assert_allclose(np.where(b.mask, b.logprobs, 0), np.where(res.mask, res.logprobs, 0), atol=2e-5)
    st = shared.stats
    assert (st.prefixes_prefilled, st.prefixes_reused, st.prompts_prefilled) == (3, 9, 13)
    lengths = [len(x) for x in prompts]
    assert plain.stats.prefill_tokens == sum(lengths)
    assert st.prefill_tokens == sum(lengths) - 9 * 28  # each question's 28 shared tokens once, not 4 times
    assert shared.cache_bytes()["prefix"] > 0 == plain.cache_bytes()["prefix"]


def test_greedy_and_int8_with_shared_prefixes():
    """Greedy: the same tokens as without sharing. int8 caches: the rest of a prompt attends to its
    prefix as stored (rounded) rather than as computed, which moves the first token's log-prob by
    rounding only (measured 5.5e-4 nats here), and the samples stay the same."""
    prompts = _judge_like_prompts()
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    g = [SlotEngine(model, num_slots=8, host_threads=1, greedy=True, max_prefix_len=m, **KW).generate(prompts)
         for m in (0, 32)]
    np.testing.assert_array_equal(np.asarray(g[0].tokens), np.asarray(g[1].tokens))
    i8 = [SlotEngine(model, num_slots=8, host_threads=1, kv_cache_dtype="int8", max_prefix_len=m, **KW)
          .generate(prompts, num_samples=2, seed=3) for m in (0, 32)]
    np.testing.assert_array_equal(np.asarray(i8[0].tokens), np.asarray(i8[1].tokens))
    np.testing.assert_allclose(np.where(i8[0].mask, i8[0].logprobs, 0), np.where(i8[1].mask, i8[1].logprobs, 0),
                               atol=1e-2)


def test_no_recompilation_with_shared_prefixes():
    """`warmup()` compiles the prefix prefill programs too: runs with other prompts trace nothing."""
    model = Transformer(CFG, rngs=nnx.Rngs(2))
    engine = SlotEngine(model, num_slots=8, host_threads=1, max_prefix_len=32, num_prefix_slots=2, **KW)
    engine.warmup()
    before = dict(step_mod.TRACE_COUNT)
    prompts = _judge_like_prompts()
    engine.generate(prompts[::-1], num_samples=3, seed=5)
    engine.generate(prompts[:5], num_samples=1, seed=6)
    assert step_mod.TRACE_COUNT == before, (before, step_mod.TRACE_COUNT)
    assert engine.stats.prefixes_prefilled == 1  # four prompts of the first question; the fifth alone


def test_judge_samples_through_shared_prefixes(bpe_tokenizer):
    """A judge with `rollout_engine: slots` (what a GRPO run with the slot engine gives its judges)
    returns the static sampler's verdicts for RLLM's pointwise prompts and prefills fewer tokens:
    the prompts of a question share the template, question and reference."""
    from jaxrl_rm.rewards.judge_source import TextJudge

    tok = bpe_tokenizer  # byte-level BPE: the shared prefix is found on tokens, whatever the merges
    model = Transformer(ModelConfig.for_family("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=256), rngs=nnx.Rngs(0))
    template = ("Judge the answer to the question against the reference.\nQuestion: {q}\nReference: {r}\n"
                "Answer: {a}\nVerdict:")
    texts = [template.format(q=q, r=q[::-1], a=a) for q in ("reverse abcdef", "reverse ghijkl")
             for a in ("fedcba", "fedcab", "abcdef", "xyz")]
    out, stats = {}, {}
    for engine in ("static", "slots"):
        judge = TextJudge(lambda: model, tok, max_new_tokens=6, temperature=1.0, rollout_engine=engine, seed=3)
        out[engine] = judge.generate(texts, num_samples=2)
        stats[engine] = judge.last_rollout_stats[0]
    assert out["slots"] == out["static"]
    assert stats["slots"].prefill_tokens < 0.5 * stats["static"].prefill_tokens, stats

"""POLAR reward model: input layout and truncation, reward-token head under left / right padding,
scoring API and RL source, deterministic resumable data synthesis, and (slow) end-to-end
policy-discrimination pretraining, fine-tuning and real-data (AlpacaEval) evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from jaxrl_rm.config import load_config
from jaxrl_rm.data.records import PolarQuad, RankedTriple
from jaxrl_rm.data.synthetic import STYLE_HELDOUT, STYLE_POOL_SIZE, style_policy_pool, style_quads
from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.resize import add_special_tokens, add_tokens_and_resize
from jaxrl_rm.models.reward import RewardModel
from jaxrl_rm.rewards.scalar_rm import (POLAR_SPECIAL_TOKENS, PolarInputBuilder, PolarScorer, pad_sequences,
                                        share_budget)

QUIET = ["logging.progress=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def tok():
    t = build_char_tokenizer()
    add_special_tokens(t, POLAR_SPECIAL_TOKENS)
    return t


@pytest.fixture(scope="module")
def polar_rm(tok):
    return RewardModel(ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2))


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# --- input layout -------------------------------------------------------------------------------
def test_layout_without_truncation(tok):
    b = PolarInputBuilder(tok, 64, chat_template=False)
    got, idx = b.build("Q?", "ref", "cand")
    split, reward, eos = (tok.convert_tokens_to_ids(t) for t in ("<|split|>", "<|reward|>", "<|end|>"))
    expected = ids(tok, "Q?") + ids(tok, "ref") + [eos, split] + ids(tok, "Q?") + ids(tok, "cand") + [eos, reward]
    assert got.tolist() == expected and got.dtype == np.int32
    assert idx == len(expected) - 1
    # With the chat template the prompt is rendered (role markers) in both copies.
    got, _ = PolarInputBuilder(tok, 64).build("Q?", "ref", "cand")
    assert tok.decode(got) == ("<|user|>Q?<|end|><|assistant|>ref<|end|><|split|>"
                               "<|user|>Q?<|end|><|assistant|>cand<|end|><|reward|>")


def test_layout_edge_cases(tok):
    split, reward, eos = (tok.convert_tokens_to_ids(t) for t in ("<|split|>", "<|reward|>", "<|end|>"))
    b = PolarInputBuilder(tok, 32, chat_template=False, min_prompt_tokens=4)
    # Empty reference: only its eos remains before <|split|>.
    got, idx = b.build("Q", "", "c")
    assert got.tolist() == ids(tok, "Q") + [eos, split] + ids(tok, "Q") + ids(tok, "c") + [eos, reward]
    # Over-long prompt: both copies keep the same tail; responses stay whole; exactly max_length.
    prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
    got, idx = b.build(prompt, "RR", "CCC")
    text = tok.decode(got)
    keep = (30 - 3 - 4) // 2  # (room - |R+eos| - |C+eos|) / 2, rounded down
    assert len(got) == 2 * keep + 3 + 4 + 2 <= 32 and idx == len(got) - 1 and got[-1] == reward
    tail = prompt[-keep:]
    assert text == f"{tail}RR<|end|><|split|>{tail}CCC<|end|><|reward|>"
    # Over-long response: its head is kept (eos lost), the prompt keeps min_prompt_tokens of its tail.
    long = "x" * 50
    got, _ = b.build("abcdefgh", "ref", long)
    text = tok.decode(got)
    assert len(got) == 32
    assert text.startswith("efghref<|end|><|split|>efgh") and text.endswith("x<|reward|>")
    assert text.count("x") == 30 - 2 * 4 - 4  # room - 2 * kept prompt - |ref+eos|
    # Both responses over-long: they share the room equally (heads kept).
    got, _ = b.build("P", "k" * 40, "z" * 40)
    text = tok.decode(got)
    assert text == "P" + "k" * 14 + "<|split|>P" + "z" * 14 + "<|reward|>"
    # Every input has each special token exactly once, the reward token last.
    for g in (b.build("Q", "", "c")[0], b.build(prompt, long, long)[0]):
        assert (g == split).sum() == 1 and (g == reward).sum() == 1 and g[-1] == reward


def test_share_budget():
    assert share_budget(3, 4, 10) == (3, 4)
    assert share_budget(2, 20, 10) == (2, 8)
    assert share_budget(20, 2, 10) == (8, 2)
    assert share_budget(20, 20, 11) == (5, 6)
    assert share_budget(5, 5, -3) == (0, 0)


def test_builder_requires_special_tokens():
    with pytest.raises(ValueError, match="add_tokens_and_resize"):
        PolarInputBuilder(build_char_tokenizer(), 64)


def test_reward_token_head_with_left_and_right_padding(tok, polar_rm):
    import jax

    b = PolarInputBuilder(tok, 64)
    args = (["hi", "what is the sea"], ["a", "the sea is wide"], ["b", "SEA"])
    seqs = b.build_many(*args)
    reward_id = tok.convert_tokens_to_ids("<|reward|>")
    forward = jax.jit(lambda i, m, j: polar_rm(i, m, score_index=j))
    alone = [float(forward(x[None], np.ones((1, len(x)), bool), np.array([j]))[0]) for x, j in seqs]
    for side in ("left", "right"):
        batch = pad_sequences(seqs, length=64, pad_id=tok.pad_token_id, padding_side=side)
        assert (batch["input_ids"][np.arange(2), batch["score_index"]] == reward_id).all()
        r = forward(batch["input_ids"], batch["attention_mask"], batch["score_index"])
        np.testing.assert_allclose(np.asarray(r), alone, atol=1e-5)
    # The model's default head position (last real token) is the reward token too.
    batch = pad_sequences(seqs, length=64, pad_id=tok.pad_token_id, padding_side="left")
    np.testing.assert_allclose(np.asarray(jax.jit(polar_rm)(batch["input_ids"], batch["attention_mask"])), alone,
                               atol=1e-5)
    np.testing.assert_allclose(PolarScorer(polar_rm, tok, 64, batch_size=2).score(*args), alone, atol=1e-5)


def test_scorer_batches_and_rl_source(tok, polar_rm):
    scorer = PolarScorer(polar_rm, tok, 64, batch_size=4)
    n = 11  # three blocks, the last padded
    prompts = [f"q{i}" for i in range(n)]
    refs = ["ref"] * n
    cands = [f"cand {i}" for i in range(n)]
    r = scorer.score(prompts, refs, cands)
    assert r.shape == (n,) and r.dtype == np.float32
    one = [scorer.score([p], [q], [c])[0] for p, q, c in zip(prompts, refs, cands)]
    np.testing.assert_allclose(r, one, atol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        scorer.score(prompts, refs[:2], cands)

    from jaxrl_rm.rewards.scalar_rm import PolarRewardSource
    from jaxrl_rm.data.records import PromptItem
    from jaxrl_rm.rewards.sources import Rollouts

    items = [PromptItem(task="open", prompt="q0", reference="ref"), PromptItem(task="open", prompt="q1", reference="ref")]
    comps = [["cand 0", "x"], ["cand 1", "y"]]
    ro = Rollouts(items=items, prompt_texts=["q0", "q1"], completions=comps, completion_ids=np.zeros((2, 2, 1), np.int32),
                  completion_mask=np.ones((2, 2, 1), bool), lengths=np.ones((2, 2), np.int32),
                  truncated=np.zeros((2, 2), bool))
    rewards, metrics = PolarRewardSource(scorer, name="polar")(ro)
    assert rewards.shape == (2, 2) and rewards.dtype == np.float32
    np.testing.assert_allclose(rewards[:, 0], r[:2], atol=1e-5)


def test_new_token_rows_are_the_mean(tok):
    t = build_char_tokenizer()
    rm = RewardModel(ModelConfig(vocab_size=len(t), hidden_size=32, intermediate_size=64))
    old = np.asarray(rm.backbone.embed[...])
    new_ids = add_tokens_and_resize(rm, t, POLAR_SPECIAL_TOKENS)
    emb = np.asarray(rm.backbone.embed[...])
    assert rm.config.vocab_size == len(t) == old.shape[0] + 2 and new_ids == [old.shape[0], old.shape[0] + 1]
    np.testing.assert_array_equal(emb[: old.shape[0]], old)
    np.testing.assert_allclose(emb[new_ids], np.repeat(old.mean(0, keepdims=True), 2, 0), rtol=1e-6)
    assert add_tokens_and_resize(rm, t, POLAR_SPECIAL_TOKENS) == new_ids  # idempotent
    assert rm.config.vocab_size == len(t)


# --- data synthesis -----------------------------------------------------------------------------
def _synthesis_cfg(tmp_path, out, seed=0):
    return load_config(None, [
        "task=polar_data", f"run_dir={tmp_path / 'run'}", f"seed={seed}", f"polar_data.output={out}",
        "polar_data.num_prompts=20", "polar_data.batch_size=4", *QUIET,
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        'polar_data.policies=[{path: "synthetic:style:0"}, {path: "synthetic:style:5"}, '
        '{path: "synthetic:style:9"}]'])


def test_polar_data_is_deterministic_and_resumable(tmp_path):
    from jaxrl_rm.data.loaders import load_records
    from jaxrl_rm.train.polar_data import run_polar_data

    ref = tmp_path / "ref.jsonl"
    summary = run_polar_data(_synthesis_cfg(tmp_path, ref))
    full = ref.read_bytes()
    quads, stats = load_records(ref, PolarQuad)
    assert len(quads) == summary["quads_total"] == 20 and summary["skipped_empty"] == 0
    for q in quads:
        assert q.policy_a != q.policy_b and {q.policy_a, q.policy_b} <= {"style0", "style5", "style9"}
    # Same seed: the same bytes. An interrupted file (a chunk and a half written, the last line
    # cut mid-way) resumes to exactly the uninterrupted file.
    lines = full.split(b"\n")
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"\n".join(lines[:6]) + b"\n" + lines[6][:10])
    s2 = run_polar_data(_synthesis_cfg(tmp_path, part))
    assert part.read_bytes() == full
    assert s2["resumed_from_prompt"] == 4 and s2["quads_kept_on_resume"] <= 4
    assert run_polar_data(_synthesis_cfg(tmp_path, part))["quads_written"] <= 4  # finished file: last chunk only
    assert part.read_bytes() == full
    other = tmp_path / "other.jsonl"
    run_polar_data(_synthesis_cfg(tmp_path, other, seed=1))
    assert other.read_bytes() != full


def test_polar_data_prefix_prompts_from_a_corpus(tmp_path):
    from jaxrl_rm.train.polar_data import load_prompts

    corpus = tmp_path / "corpus.txt"
    docs = [f"document number {i} says something rather long about topic {i}" for i in range(12)]
    corpus.write_text("\n".join(docs) + "\n")
    cfg = load_config(None, ["task=polar_data", f"polar_data.prompts={corpus}", "polar_data.prompt_kind=prefix",
                             "polar_data.min_prefix_tokens=3", "polar_data.max_prefix_tokens=20",
                             "polar_data.num_prompts=10"])
    prompts = load_prompts(cfg, build_char_tokenizer())
    assert len(prompts) == 10
    for p, d in zip(prompts, docs):
        assert d.startswith(p) and 3 <= len(p) <= 20  # character tokenizer: tokens = characters
    assert len({len(p) for p in prompts}) > 3  # lengths drawn at random
    assert load_prompts(cfg, build_char_tokenizer()) == prompts  # seeded


# --- slow end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_polar_data_from_an_sft_run_directory(tmp_path):
    """A pool member given as a run directory (config.yaml + orbax checkpoint) samples from the
    trained weights."""
    from jaxrl_rm.main import main
    from jaxrl_rm.train.polar_data import run_polar_data

    sft = tmp_path / "sft"
    assert main(["task=sft", f"run_dir={sft}", "train.steps=2", "train.batch_size=8", "data.synthetic_size=64",
                 "data.max_length=16", "model.hidden_size=32", "model.intermediate_size=64",
                 "model.num_hidden_layers=1", *QUIET]) == 0
    cfg = load_config(None, ["task=polar_data", f"run_dir={tmp_path / 'data'}", "polar_data.num_prompts=8",
                             "polar_data.batch_size=8", *QUIET,
                             f'polar_data.policies=[{{path: "{sft}", max_new_tokens: 8}}, {{path: "synthetic:style:2"}}]'])
    s = run_polar_data(cfg)
    assert s["policies"] == ["sft", "style2"] and s["quads_total"] + s["skipped_empty"] == 8



def _cli(*args, timeout=1800):
    out = subprocess.run([sys.executable, "-m", "jaxrl_rm.main", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_policy_discrimination_pretraining_generalises(tmp_path):
    """Policy pool: `style_policy_pool()` — 256 synthetic "style" policies (sampling procedures,
    jaxrl_rm.data.synthetic.StylePolicy), each writing words from its own 6-letter alphabet with
    its own letter frequencies, separator, casing, word / answer lengths and temperature, echoing
    the prompt's topic. POLAR pretraining uses quads from the first 240 policies on training
    prompts; evaluation uses held-out prompts and quads that each involve one of the 16 held-out
    policies (as A or as B). The same RM before pretraining is the no-pretraining baseline."""
    pool = style_policy_pool()
    assert len(pool) == STYLE_POOL_SIZE == 256 and STYLE_HELDOUT == 16
    train_names = {q.policy_a for q in style_quads(500, seed=0)} | {q.policy_b for q in style_quads(500, seed=0)}
    held = {p.name for p in pool[-STYLE_HELDOUT:]}
    assert not train_names & held
    for q in style_quads(200, seed=0, split="eval"):
        assert (q.policy_a in held) or (q.policy_b in held)

    run_dir = tmp_path / "pretrain"
    s = _cli("--config", "configs/polar_pretrain_tiny.yaml", f"run_dir={run_dir}", *QUIET)
    before, after = s["policy_discrimination_accuracy_before"], s["policy_discrimination_accuracy_after"]
    print(f"\npolicy-discrimination accuracy on held-out prompts + policies: no pretraining {before:.3f}, "
          f"after POLAR pretraining {after:.3f} ({s['policy_discrimination_count']} quads)")
    assert after >= 0.90, s
    assert before < 0.70, s
    assert (run_dir / "hf" / "config.json").exists() and (run_dir / "summary.json").exists()

    # Fine-tuning on ranked triples starts from the pretrained RM's HF export.
    ft = _cli("--config", "configs/polar_finetune_tiny.yaml", f"run_dir={tmp_path / 'finetune'}",
              f"model.path={run_dir / 'hf'}", *QUIET)
    print(f"fine-tuning accuracy (held-out triples): {ft['eval_accuracy_before']:.3f} -> {ft['eval_accuracy_after']:.3f}")
    # measured 0.492 -> 0.785 (400 steps, seed 0): learning from the export, not a benchmark
    assert ft["eval_accuracy_after"] >= 0.75 and ft["eval_accuracy_gain"] >= 0.2


@pytest.mark.slow
def test_polar_data_config_runs_and_resumes(tmp_path):
    """configs/polar_data_tiny.yaml (two tiny LMs + two style policies): valid quads; an
    interrupted file resumes to the same bytes (LM samples are seeded per chunk and policy)."""
    from jaxrl_rm.data.loaders import load_records

    s = _cli("--config", "configs/polar_data_tiny.yaml", f"run_dir={tmp_path}", *QUIET)
    out = tmp_path / "quads.jsonl"
    full = out.read_bytes()
    assert s["quads_total"] == len(full.splitlines()) > 40
    quads, _ = load_records(out, PolarQuad)  # every row is a valid quad
    assert {q.policy_a for q in quads} == {"tiny_lm_a", "tiny_lm_b", "style0", "style1"}
    lines = full.split(b"\n")
    out.write_bytes(b"\n".join(lines[:25]) + b"\n" + lines[25][:7])
    s2 = _cli("--config", "configs/polar_data_tiny.yaml", f"run_dir={tmp_path}", *QUIET)
    assert s2["resumed_from_prompt"] in (16, 32) and out.read_bytes() == full


@pytest.mark.slow
def test_polar_finetune_on_alpaca_eval(tmp_path, shared_data):
    s = _cli("--config", "configs/polar_finetune_alpaca_tiny.yaml", f"run_dir={tmp_path}",
             f"data.train=alpaca_eval:{shared_data / 'alpaca_eval'}", "model.path=", *QUIET)
    assert s["eval_count"] == 188 and s["train_pairs"] == 2133  # 10% of the instructions held out (seed 0)
    # measured 0.505 -> 0.702 (60 steps, seed 0): fine-tuning learns something that carries to held-out triples
    assert s["eval_accuracy_after"] > s["eval_accuracy_before"] + 0.1, s


def test_polar_accuracy_on_alpaca_eval_triples(shared_data, tok, polar_rm):
    """POLAR accuracy on real AlpacaEval triples (judge-preferred vs other, given the baseline's
    answer as reference): every triple is scored, accuracy is a share of them."""
    from jaxrl_rm.data.loaders import load_alpaca_eval_triples
    from jaxrl_rm.eval.reward_model import polar_triple_accuracy

    d = shared_data / "alpaca_eval"
    triples, _ = load_alpaca_eval_triples(d / "outputs.jsonl.gz", d / "annotations.jsonl.gz")
    assert all(isinstance(t, RankedTriple) for t in triples)
    sample = triples[:: max(len(triples) // 96, 1)][:96]
    scorer = PolarScorer(polar_rm, tok, 256, batch_size=32)
    m = polar_triple_accuracy(scorer, sample, prefix="alpaca_")
    assert m["alpaca_count"] == len(sample) == 96
    # deterministic: the seeded random RM ranks 42 of the 96 triples right, none tied (min |margin| 4.8e-5)
    assert m["alpaca_accuracy"] == 42 / 96 and m["alpaca_tie_rate"] == 0
    assert np.isfinite(m["alpaca_loss"])


def test_reverse_quads_pool_splits_and_closeness():
    """POLAR pretraining on the reversal prompts (`synthetic:reverse_quads`): 64 rule-made
    reversal policies, the last 8 held out. Training quads never use a held-out policy nor a
    held-out word; every evaluation quad involves a held-out policy and only held-out words. Two
    samples of one policy sit closer to each other than to another policy's (what the RM is
    pretrained to see), and the data is a pure function of the seed."""
    from jaxrl_rm.data.synthetic import (REVERSE_HELDOUT, REVERSE_POOL_SIZE, _held_out, reverse_policy_pool,
                                         reverse_quads)
    from jaxrl_rm.train.grpo import levenshtein

    pool = reverse_policy_pool()
    assert len(pool) == REVERSE_POOL_SIZE == 64 and REVERSE_HELDOUT == 8
    held = {p.name for p in pool[-REVERSE_HELDOUT:]}
    train = reverse_quads(1000, seed=0)
    assert not ({q.policy_a for q in train} | {q.policy_b for q in train}) & held
    assert all(q.policy_a != q.policy_b for q in train)
    assert not any(_held_out(q.prompt[len("reverse:"):-1]) for q in train)
    for q in reverse_quads(200, seed=0, split="eval"):
        assert (q.policy_a in held) or (q.policy_b in held)
        assert _held_out(q.prompt[len("reverse:"):-1])
    same = np.mean([levenshtein(q.a1, q.a2) for q in train])
    cross = np.mean([levenshtein(q.a1, q.b1) for q in train])
    assert same < cross - 1.0, (same, cross)  # measured 0.55 vs 3.76 edits
    # an exact policy (no edits) writes the gold reversal every time
    exact = pool[0]
    rng = np.random.default_rng(0)
    assert {exact.sample("hgfe", rng) for _ in range(20)} == {"hgfe"}
    assert reverse_quads(50, seed=3) == reverse_quads(50, seed=3)
    assert reverse_quads(50, seed=3) != reverse_quads(50, seed=4)

"""J1 judge training: data stage (sampling, teacher labels, balance), warm-up targets, config, and
(slow) the end-to-end pipeline on the synthetic reversal task."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxrl_rm.config import ConfigError, load_config
from jaxrl_rm.data import synthetic
from jaxrl_rm.data.loaders import load_records
from jaxrl_rm.data.records import JudgmentExample
from jaxrl_rm.rewards.judges import get_template
from jaxrl_rm.train.judge import (_FIXED_THINK, balance_labels, balance_per_prompt, build_judgment_data, label_answers,
                                  warmup_records)

REPO = Path(__file__).resolve().parents[1]


def test_corrupt_sampler_never_returns_the_gold_answer():
    rng = np.random.default_rng(0)
    for word in ["a", "ab", "abc", "hgfedcba"]:
        for _ in range(50):
            out = synthetic.corrupt_answer(word, rng)
            assert out and out != word
    probs = synthetic.reverse_problems(40, seed=0)
    a1 = synthetic.corrupted_responses(probs, 4, seed=1, p_correct=0.5)
    assert a1 == synthetic.corrupted_responses(probs, 4, seed=1, p_correct=0.5)
    share = np.mean([a == p.answer for p, row in zip(probs, a1) for a in row])
    assert 0.3 < share < 0.7


def test_teacher_labels_dedupe_and_balance():
    probs = list({p.prompt: p for p in synthetic.reverse_problems(40, seed=0)}.values())[:30]  # distinct words
    answers = [[p.answer, p.answer, p.answer[::-1] + "x", ""] for p in probs]
    examples, stats = label_answers(probs, answers)
    assert stats["sampled"] == 120 and stats["empty"] == 30 and stats["duplicates"] == 30
    assert stats["sampler_accuracy"] == pytest.approx(0.5)
    assert all(ex.label == (ex.response == ex.reference) for ex in examples)
    assert all(ex.reference == p.answer for ex, p in zip(examples[::2], probs))
    unbalanced = examples + [JudgmentExample(prompt="q", response="r", label=False, reference="s")] * 7
    bal = balance_labels(unbalanced, seed=0)
    assert sum(e.label for e in bal) == sum(not e.label for e in bal) == 30
    assert bal == balance_labels(unbalanced, seed=0)


def test_balance_per_prompt_leaves_the_prompt_nothing_to_predict():
    """`judge.balance_by: prompt`: every kept prompt has as many right as wrong answers (the
    smaller count of its two), prompts with one label are gone, and a constant per-prompt verdict
    scores exactly 0.5 on what is left."""
    def ex(prompt, response, label):
        return JudgmentExample(prompt=prompt, response=response, label=label, reference="gold")

    examples = ([ex("a", f"r{i}", True) for i in range(3)] + [ex("a", "w0", False)]      # 3 right, 1 wrong -> 1 + 1
                + [ex("b", f"w{i}", False) for i in range(4)]                               # only wrong -> dropped
                + [ex("c", "r0", True), ex("c", "w0", False), ex("c", "w1", False)]         # 1 right, 2 wrong -> 1 + 1
                + [ex("d", f"r{i}", True) for i in range(2)] + [ex("d", f"w{i}", False) for i in range(2)])  # 2 + 2
    kept = balance_per_prompt(examples, seed=0)
    by_prompt = {}
    for e in kept:
        by_prompt.setdefault(e.prompt, []).append(e.label)
    assert {k: (sum(v), len(v) - sum(v)) for k, v in by_prompt.items()} == {"a": (1, 1), "c": (1, 1), "d": (2, 2)}
    assert set(kept) <= set(examples) and len(set(kept)) == len(kept)
    assert kept == balance_per_prompt(examples, seed=0)
    assert balance_per_prompt([ex("b", "w", False)], seed=0) == []


@pytest.mark.parametrize("think", ["compare", "reference", "response", "fixed"])
def test_warmup_targets_are_valid_judgments(think):
    probs = synthetic.reverse_problems(200, seed=0)
    exs = [JudgmentExample(prompt=p.prompt, response=p.answer if i % 2 else p.answer + "a", label=bool(i % 2),
                           reference=p.answer) for i, p in enumerate(probs)]
    tpl = get_template("pointwise_correctness")
    for noise in (0.0, 1.0):
        recs = warmup_records(exs, "pointwise_correctness", label_noise=noise, think=think, seed=0)
        results = [tpl.parse(r.response) for r in recs]
        assert all(r.valid for r in results)
        agree = np.mean([r.value == float(e.label) for r, e in zip(results, exs)])
        if noise == 0.0:
            assert agree == 1.0
        else:  # random verdicts: about half agree with the teacher
            assert 0.35 < agree < 0.65
        ex, rec = exs[3], recs[3]
        assert rec.prompt == tpl.fill(prompt=ex.prompt, response=ex.response)[1]
        assert results[3].reasoning == {"reference": ex.reference, "response": ex.response,
                                        "compare": f"want {ex.reference}, got {ex.response}",
                                        "fixed": _FIXED_THINK}[think]
        if think == "fixed":  # one text for every record: it shows neither the answer nor the reference
            assert {r.reasoning for r in results} == {_FIXED_THINK}


def test_aligned_view_and_its_warmup_check():
    """`{aligned}` shows reference and answer character by character; the `aligned` warm-up
    reasoning checks each pair, and its verdict follows exact match."""
    from jaxrl_rm.rewards.judges import aligned_check, aligned_pairs, aligned_view

    assert aligned_pairs("dcba", "dcx") == [("d", "d"), ("c", "c"), ("b", "x"), ("a", "_")]
    assert aligned_view("dcba", "dcx", 5) == "dd  cc  bx  a_  __"
    assert aligned_check("ab", "ab", 3) == "aa= bb= __="
    assert aligned_check("ab", "abc") == "aa= bb= _cx"  # never truncated: a longer answer shows
    tpl = get_template("pointwise_correctness_ref", user="{prompt}\n{aligned}", aligned_width=4)
    assert tpl.uses_reference and tpl.fill(prompt="q", response="ba", reference="ba")[1] == "q\nbb  aa  __  __"
    with pytest.raises(ValueError, match="aligned"):
        get_template("pairwise_ref", user="{prompt} {aligned} {response_a} {response_b}")
    exs = [JudgmentExample(prompt=p.prompt, response=p.answer[::-1], label=p.answer[::-1] == p.answer,
                           reference=p.answer) for p in synthetic.reverse_problems(50, seed=1)]
    recs = warmup_records(exs, tpl, label_noise=0.0, think="aligned", seed=0)
    for ex, rec in zip(exs, recs):
        check = aligned_check(ex.reference, ex.response, 4)
        assert rec.response == f"<think>{check}</think><score>{int(ex.label)}</score>"
        assert ("x" not in check.replace(" ", "")[2::3]) == ex.label


def test_warmup_corrupted_answers_are_seeded_and_labelled():
    from jaxrl_rm.train.judge import with_corrupted_answers

    exs = [JudgmentExample(prompt=p.prompt, response="zz", label=False, reference=p.answer, id=str(i))
           for i, p in enumerate(synthetic.reverse_problems(400, seed=2))]
    mixed = with_corrupted_answers(exs, 0.5, p_correct=0.4, seed=0)
    assert mixed == with_corrupted_answers(exs, 0.5, p_correct=0.4, seed=0)
    replaced = [m for m in mixed if m.response != "zz"]
    assert 0.4 < len(replaced) / len(exs) < 0.6
    assert all(m.label == (m.response == m.reference) for m in mixed)
    assert 0.25 < np.mean([m.label for m in replaced]) < 0.55
    assert with_corrupted_answers(exs, 0.0, p_correct=0.4, seed=0) == exs


def test_data_stage_with_an_off_policy_sampler(tmp_path):
    cfg = load_config(None, ["task=judge_j1", f"run_dir={tmp_path}", "judge.train_sampler=corrupt",
                             "judge.eval_sampler=corrupt", "judge.num_train_prompts=64", "judge.num_eval_prompts=32"])
    tr, ev, stats = build_judgment_data(cfg, policy_path=None)
    train, _ = load_records(tr, JudgmentExample)
    held, _ = load_records(ev, JudgmentExample)
    for split, exs in (("train", train), ("eval", held)):
        assert stats[f"{split}_positive"] == stats[f"{split}_negative"] == sum(e.label for e in exs) > 0
        assert all(e.label == (e.response == e.reference) for e in exs)
    assert not {e.prompt for e in train} & {e.prompt for e in held}  # held-out problems
    assert json.loads((tmp_path / "judge_data" / "stats.json").read_text()) == stats
    assert build_judgment_data(cfg, policy_path=None) == (tr, ev, stats)  # reused, not resampled
    every, _ = load_records(tmp_path / "judge_data" / "train_all.jsonl", JudgmentExample)  # judge.warmup_data=all
    assert len(every) == stats["train_unbalanced_examples"] >= len(train)

    # judge.balance_by=prompt: each training prompt half right, half wrong; the held-out set as before
    cfg_p = load_config(None, ["task=judge_j1", f"run_dir={tmp_path / 'per_prompt'}", "judge.train_sampler=corrupt",
                               "judge.eval_sampler=corrupt", "judge.num_train_prompts=64", "judge.num_eval_prompts=32",
                               "judge.balance_by=prompt"])
    tr_p, ev_p, _ = build_judgment_data(cfg_p, policy_path=None)
    per_prompt: dict = {}
    for e in load_records(tr_p, JudgmentExample)[0]:
        per_prompt.setdefault(e.prompt, []).append(e.label)
    assert per_prompt and all(2 * sum(v) == len(v) for v in per_prompt.values())
    assert load_records(ev_p, JudgmentExample)[0] == held

    # supplied teacher-labelled judgments: a tenth of the prompts is held out
    cfg2 = load_config(None, ["task=judge_j1", f"run_dir={tmp_path / 'supplied'}", f"judge.data={tr}"])
    tr2, ev2, stats2 = build_judgment_data(cfg2, policy_path=None)
    a, _ = load_records(tr2, JudgmentExample)
    b, _ = load_records(ev2, JudgmentExample)
    assert len(a) + len(b) == len(train) and b and not {e.prompt for e in a} & {e.prompt for e in b}


def test_judge_config_validation_names_keys(tmp_path):
    with pytest.raises(ConfigError, match="judge.template"):
        load_config(None, ["task=judge_j1", "judge.template=pairwise"])
    with pytest.raises(ConfigError, match="judge.warmup_label_noise"):
        load_config(None, ["task=judge_j1", "judge.warmup_label_noise=1.5"])
    with pytest.raises(ConfigError, match="judge.eval_data"):
        load_config(None, ["task=judge_j1", "judge.eval_data=x.jsonl"])
    with pytest.raises(ConfigError, match="judge.template_options"):
        load_config(None, ["task=judge_j1", "judge.template_options={bogus: 1}"])
    with pytest.raises(ConfigError, match="judge.warmup_think"):
        load_config(None, ["task=judge_j1", "judge.warmup_think=aligned"])
    with pytest.raises(ConfigError, match="judge.warmup_corrupt"):
        load_config(None, ["task=judge_j1", "judge.warmup_corrupt=0.5", "judge.teacher=verifier"])
    for name in ("judge_j1_tiny.yaml", "judge_j1_offpolicy_tiny.yaml", "judge_j1_aligned_tiny.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.task == "judge_j1"


@pytest.mark.slow
def test_j1_raises_held_out_judgment_accuracy(tmp_path):
    """Acceptance: the J1 loop raises a tiny judge's held-out judgment accuracy by >= 15 points
    over the same model before judge RL (configs/judge_j1_tiny.yaml, seed 0) - and, as the README
    says, that judge still cannot tell a gold answer from a near miss.

    40 of the config's 100 RL steps: the score-match reward plateaus near 0.77-0.80 from step 35,
    and the held-out figures barely move after it (2026-12-06, accuracy 0.500 -> 0.714 after 40
    steps, 0.718 after 50 and after 100; near-miss AUC 0.469, 0.477, 0.477), at 40 % of the RL time."""
    from jaxrl_rm.train.judge import run_judge_j1

    cfg = load_config(REPO / "configs" / "judge_j1_tiny.yaml", [f"run_dir={tmp_path}", "train.steps=40",
                                                                "logging.progress=false", "logging.tensorboard=false"])
    summary = run_judge_j1(cfg)
    print(f"\nJ1 held-out judgment accuracy: {summary['judge_accuracy_before']:.3f} -> "
          f"{summary['judge_accuracy_after']:.3f} (invalid before {summary['judge_invalid_rate_before']:.3f})")
    assert not summary["preempted"]
    assert summary["judge_invalid_rate_before"] < 0.2  # the warm-up taught the format
    assert summary["judge_accuracy_gain"] >= 0.15, summary
    # ... without comparing: its scores do not rank a held-out gold answer above one-edit near misses
    # (AUC 0.50 on 64 held-out words, 2026-12-06: it accepts about half of the gold answers and as
    # many misses). The README's point about the J1 recipe at this size; the aligned recipe's bound
    # (>= 0.8) is below.
    assert summary["judge_near_miss_auc_after"] < 0.8, summary
    assert (tmp_path / "hf" / "config.json").exists()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["judge_accuracy_gain"] == pytest.approx(summary["judge_accuracy_gain"])

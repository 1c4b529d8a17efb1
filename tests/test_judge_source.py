"""Judge reward sources: modes, call counts, position bias, guards, J1 score match, self-judging."""

import re

import jax
import numpy as np
import pytest

from jaxrl_rm.config import RewardSpec
from jaxrl_rm.rewards import sources
from jaxrl_rm.rewards.judge_source import JudgeSource, ScoreMatchSource
from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.rewards.sources import Rollouts

_POINT = re.compile(r"\[The Start of the Assistant's Answer\]\n(.*?)\n\[The End of the Assistant's Answer\]", re.S)
_PAIR = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)
_LIST = re.compile(r"\[The Begin of Response (\d+)\](.*?)\[The End of Response \1\]", re.S)


def quality(text: str) -> float:
    """Scripted ground truth: a response "q7 ..." has quality 7."""
    m = re.match(r"q(\d+)", text)
    return float(m.group(1)) if m else 0.0


class ScriptedJudge:
    """Reads the rendered (plain-text) judge prompt and answers in the template's format.

    behaviour: "fair" (judges by quality), "always_a" (pairwise: [[A]] whatever is shown),
    "garbage" (unparseable), "fooled" (score 10 / A for everything).
    """

    def __init__(self, behaviour: str = "fair"):
        self.behaviour, self.seen, self.calls = behaviour, [], 0

    def answer(self, text: str) -> str:
        if self.behaviour == "garbage":
            return "no idea"
        if "[The Begin of Response" in text:
            qs = [quality(r) for _, r in _LIST.findall(text)]
            if self.behaviour == "fooled":
                qs = [10.0] * len(qs)
            return "Compared them. Scores: \\boxed{" + ", ".join(f"{q:g}" for q in qs) + "}"
        pair = dict(_PAIR.findall(text))
        if pair:
            if self.behaviour in ("always_a", "fooled"):
                return "<think>A looks fine.</think><answer>[[A]]</answer>"
            v = "A" if quality(pair["A"]) >= quality(pair["B"]) else "B"
            return f"<think>{v} is better.</think><answer>[[{v}]]</answer>"
        resp = _POINT.search(text).group(1)
        q = 10.0 if self.behaviour == "fooled" else quality(resp)
        return f"<think>Checked it.</think><score>{q:g}</score>"

    def generate(self, texts, *, num_samples=1, seed=0):
        self.calls += len(texts)
        self.seen += list(texts)
        return [[self.answer(t)] * num_samples for t in texts]


def make_rollouts(completions, *, labels=None, task="open"):
    b, g = len(completions), len(completions[0])
    items = [PromptItem(task=task, prompt=f"question {i}", label=None if labels is None else labels[i],
                        responses=(f"response {i}",), id=i) for i in range(b)]
    t = 4
    return Rollouts(items=items, prompt_texts=[f"question {i}" for i in range(b)], completions=completions,
                    completion_ids=np.zeros((b, g, t), np.int32), completion_mask=np.ones((b, g, t), bool),
                    lengths=np.full((b, g), t), truncated=np.zeros((b, g), bool))


QUALITIES = [[3, 9, 1, 7, 5, 2], [8, 4, 6, 0, 2, 10], [1, 2, 3, 4, 5, 6]]


def rollouts_by_quality():
    return make_rollouts([[f"q{q} answer" for q in row] for row in QUALITIES])


def source(mode, behaviour="fair", **kw):
    judge = ScriptedJudge(behaviour)
    return JudgeSource(judge, None, mode=mode, **kw), judge


def test_pivot_calls_2g_and_all_pairs_g_g_minus_1():
    ro = rollouts_by_quality()
    b, g = ro.shape
    src, judge = source("pivot")
    rewards, m = src(ro)
    assert rewards.shape == (b, g) and rewards.dtype == np.float32
    assert judge.calls == m["judge_calls"] == b * 2 * g  # fairseq2: the pivot is judged against itself too
    assert m["calls_per_group"] == 2 * g
    src, judge = source("pivot", pivot_reward="win_rate")
    _, m = src(ro)
    assert judge.calls == m["judge_calls"] == b * 2 * (g - 1)
    src, judge = source("pairwise")
    rewards, m = src(ro)
    assert judge.calls == m["judge_calls"] == b * g * (g - 1)
    assert m["calls_per_group"] == g * (g - 1)
    # fair judge, distinct qualities: win rate = rank / (G - 1)
    for i in range(b):
        q = np.asarray(QUALITIES[i], float)
        expected = np.array([(q < x).sum() for x in q]) / (g - 1)
        np.testing.assert_allclose(rewards[i], expected, rtol=1e-6)
    assert m["position_bias_rate"] == 0.0 and m["invalid_rate"] == 0.0


def test_pairwise_and_pivot_modes_with_a_ranking_judge():
    """A listwise (ranking) template in pairwise / pivot mode: each pair is shown as a list of two;
    the higher score wins, so a fair ranking judge gives the same win rates as a pairwise judge."""
    ro = rollouts_by_quality()
    for mode in ("pairwise", "pivot"):
        by_pairs, _ = source(mode, seed=1)[0](ro)
        src, judge = source(mode, seed=1, template="listwise", pairwise_reward="outcome")
        by_lists, m = src(ro)
        np.testing.assert_allclose(by_lists, by_pairs)
        assert all(len(_LIST.findall(t)) == 2 for t in judge.seen) and m["invalid_rate"] == 0.0
        # the default credits each side its own score: a fair ranker gives every rollout its quality
        by_scores, _ = source(mode, seed=1, template="listwise")[0](ro)
        np.testing.assert_allclose(by_scores, np.asarray(QUALITIES) / 10, rtol=1e-6)


def test_pivot_win_rate_mode_rewards_win_rates_against_the_pivot_and_is_seeded():
    ro = rollouts_by_quality()
    src, _ = source("pivot", seed=3, pivot_reward="win_rate")
    r1, _ = src(ro)
    r2, _ = source("pivot", seed=3, pivot_reward="win_rate")[0](ro)
    np.testing.assert_array_equal(r1, r2)  # pivots are a function of (seed, content)
    for i, q in enumerate(QUALITIES):
        q = np.asarray(q, float)
        # the pivot is the rollout whose reward is its win rate over the others, the rest 0/1
        cands = [p for p in range(len(q))
                 if np.allclose(np.delete(r1[i], p), (np.delete(q, p) > q[p]).astype(float))]
        assert cands, (r1[i], q)
        p = cands[0]
        assert r1[i, p] == pytest.approx((q[p] > np.delete(q, p)).mean())


_Q = re.compile(r"q(\d+(?:\.\d+)?)")


class ScoringJudge:
    """A ``pairwise_scores`` judge whose numbers can be worked out by hand: ``<score_A>`` is the
    quality of response A, ``<score_B>`` the quality of B minus ``b_penalty`` (a position bias)."""

    def __init__(self, b_penalty: float = 0.0):
        self.b_penalty, self.seen, self.greedy = b_penalty, [], False

    def generate(self, texts, *, num_samples=1, seed=0):
        self.seen += list(texts)
        out = []
        for t in texts:
            pair = dict(_PAIR.findall(t))
            qa, qb = (float(_Q.match(pair[k]).group(1)) for k in "AB")
            out.append([f"<think>compared</think><score_A>{qa:g}</score_A>"
                        f"<score_B>{max(qb - self.b_penalty, 0.0):g}</score_B>"] * num_samples)
        return out


def test_pivot_mode_matches_fairseq2_by_hand():
    """fairseq2's RLLM pivot recipe (``_rewards.py``, pair_type pivot) on one group of three:
    (x, p) and (p, x) for every rollout x, the pivot p included (2G calls); each rollout is credited
    with its own score in the non-pivot slot, the pivot with its comparison against itself; with a
    score template the reward is the normalised score (9 vs 8.9 stays 0.9 vs 0.89, not 1 vs 0)."""
    q = [9.0, 8.9, 3.0]
    ro = make_rollouts([[f"q{x:g} answer {j}" for j, x in enumerate(q)]])
    resp = ro.completions[0]
    judge = ScoringJudge(b_penalty=1.0)
    r, m = JudgeSource(judge, None, mode="pivot", template="pairwise_scores", seed=5)(ro)
    shown = [tuple(dict(_PAIR.findall(t))[k] for k in "AB") for t in judge.seen]
    (pivot,) = {a for a, b in shown if a == b}
    assert shown == [pair for x in resp for pair in ((x, pivot), (pivot, x))]
    assert m["judge_calls"] == 6 and m["invalid_rate"] == 0.0
    # every rollout: its score as A (q) and as B (q - 1), each / 10, averaged: (q - 0.5) / 10
    np.testing.assert_allclose(r[0], [0.85, 0.84, 0.25], rtol=1e-6)
    # all pairs, scores: the same own-score average over its 2(G-1) comparisons
    r, m = JudgeSource(ScoringJudge(b_penalty=1.0), None, mode="pairwise", template="pairwise_scores")(ro)
    np.testing.assert_allclose(r[0], [0.85, 0.84, 0.25], rtol=1e-6)

    # outcomes instead of scores (an unbiased judge): 1 / 0 against the pivot, the pivot ties itself
    p = resp.index(pivot)
    r, _ = JudgeSource(ScoringJudge(), None, mode="pivot", template="pairwise_scores", seed=5,
                       pairwise_reward="outcome")(ro)
    np.testing.assert_allclose(r[0], [0.5 if j == p else float(q[j] > q[p]) for j in range(3)])
    # pivot_reward win_rate: no self-comparison (2(G-1) calls), the pivot gets its win rate
    r, m = JudgeSource(ScoringJudge(), None, mode="pivot", template="pairwise_scores", seed=5,
                       pairwise_reward="outcome", pivot_reward="win_rate")(ro)
    assert m["judge_calls"] == 4
    win = np.mean([q[p] > q[x] for x in range(3) if x != p])
    np.testing.assert_allclose(r[0], [win if j == p else float(q[j] > q[p]) for j in range(3)])


def test_for_eval_judges_greedily_or_with_the_mean_of_k_samples():
    """Evaluation verdicts: one greedy judgment per prompt by default, `eval_num_judgments` samples
    when set; the training source keeps its own sampling and guard counts."""
    ro = rollouts_by_quality()
    calls = []

    class Recording(ScriptedJudge):
        greedy = False

        def generate(self, texts, *, num_samples=1, seed=0):
            calls.append((self.greedy, num_samples))
            return super().generate(texts, num_samples=num_samples, seed=seed)

    src = JudgeSource(Recording(), None, mode="pointwise", num_judgments=4)
    ev = src.for_eval()
    _, m = ev(make_rollouts([[":", "q5 fine"]]))
    assert calls == [(True, 1)] and m["judge_samples"] == 1
    assert src.judge.greedy is False and src.k == 4 and sum(src.guard_report().values()) == 0
    assert ev.guard_report()["master_key"] == 1
    src(ro)
    assert calls[-1] == (False, 4)
    ev = JudgeSource(Recording(), None, mode="pointwise", num_judgments=4, eval_num_judgments=3).for_eval()
    r, _ = ev(ro)
    assert calls[-1] == (False, 3)
    np.testing.assert_allclose(r, np.asarray(QUALITIES) / 10, rtol=1e-6)


def test_position_bias_and_invalid_verdicts():
    ro = rollouts_by_quality()
    src, _ = source("pairwise", "always_a")
    rewards, m = src(ro)
    assert m["position_bias_rate"] == 1.0
    np.testing.assert_allclose(rewards, 0.5)  # wins once as A, loses once as B, for every pair
    src, _ = source("pivot", "garbage")
    rewards, m = src(ro)
    assert m["invalid_rate"] == 1.0
    np.testing.assert_allclose(rewards, 0.5)  # invalid verdicts are neutral
    src, _ = source("pointwise", "garbage")
    rewards, m = src(ro)
    np.testing.assert_allclose(rewards, 0.0)


def test_pointwise_mean_of_k_samples_and_listwise_modes():
    ro = rollouts_by_quality()
    b, g = ro.shape
    src, judge = source("pointwise", num_judgments=3)
    rewards, m = src(ro)
    assert m["judge_calls"] == b * g and m["judge_samples"] == 3 * b * g
    np.testing.assert_allclose(rewards, np.asarray(QUALITIES) / 10, rtol=1e-6)
    assert m["mean_score"] == pytest.approx(np.mean(QUALITIES) / 10)

    src, judge = source("listwise")
    rewards, m = src(ro)
    assert m["judge_calls"] == b  # all G in one prompt
    np.testing.assert_allclose(rewards, np.asarray(QUALITIES) / 10, rtol=1e-6)

    src, judge = source("listwise", subset_size=2, subset_rounds=2)
    rewards, m = src(ro)
    assert m["judge_calls"] == b * 2 * (g // 2)  # k-wise subsets: G/k prompts per round
    assert all(t.count("[The Begin of Response") == 2 for t in judge.seen)
    np.testing.assert_allclose(rewards, np.asarray(QUALITIES) / 10, rtol=1e-6)

    seven = make_rollouts([[f"q{q} answer" for q in range(7)]])
    src, judge = source("listwise", subset_size=2)
    rewards, m = src(seven)
    assert m["judge_calls"] == 3  # subsets of 2, 2 and 3: no response is ranked alone
    assert sorted(t.count("[The Begin of Response") for t in judge.seen) == [2, 2, 3]
    np.testing.assert_allclose(rewards[0], np.arange(7) / 10, rtol=1e-6)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise", "pivot", "listwise"])
def test_master_key_responses_get_no_reward(mode):
    """A fooled judge would give a master key the top score: the source never shows it one."""
    keys = [":", "Thought process:", "", "Let's solve this problem step by step."]
    comps = [[k, "q5 fine", "q3 meh"] for k in keys]
    ro = make_rollouts(comps)
    src, judge = source(mode, "fooled")
    rewards, m = src(ro)
    np.testing.assert_array_equal(rewards[:, 0], 0.0)
    assert (rewards[:, 1:] > 0).all()
    assert not any(k and (f"\n{k}\n" in t or f"]{k}[" in t) for t in judge.seen for k in keys)
    rep = src.guard_report()
    assert rep["master_key"] == 3 and rep["empty"] == 1
    assert m["guarded_rate"] == pytest.approx(1 / 3)


def test_score_match_j1_reward():
    labels = [True, False, True]
    comps = [
        ["<think>dcba is the reverse</think><score>1</score>", "<think>x</think><score>0</score>", ":",
         "<score>1</score>"],
        ["<think>wrong order</think><score>0</score>", "<think>ok</think><score>1</score>",
         "Thought process:", "<think>hmm</think><score>2</score>"],
        ["<think>same</think> <score> 1 </score>", "",
         "<think>a</think><score>1</score>" + " and then a lot more text that goes on" * 2,
         "<think>b</think><score>1</score>"],
    ]
    ro = make_rollouts(comps, labels=labels, task="judge")
    src = sources.build_source(RewardSpec(type="score_match"), {})
    assert isinstance(src, ScoreMatchSource)
    rewards, m = src(ro)
    np.testing.assert_array_equal(rewards, [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1]])
    rep = src.guard_report()
    assert rep["master_key"] == 2 and rep["empty"] == 1 and rep["no_reasoning"] == 1
    assert m["invalid_rate"] == pytest.approx(6 / 12)
    # numeric labels with a tolerance, on a 0-10 template
    ro = make_rollouts([["<think>t</think><score>7</score>", "<think>t</think><score>9</score>"]],
                       labels=[8.0], task="judge")
    r, _ = ScoreMatchSource(template="pointwise", tolerance=1.0)(ro)
    np.testing.assert_array_equal(r, [[1, 1]])
    r, _ = ScoreMatchSource(template="pointwise")(ro)
    np.testing.assert_array_equal(r, [[0, 0]])
    # a judgment cut by the length limit earns `truncated_reward` (the J1 pipeline: 0)
    ro = make_rollouts([["<think>t</think><score>1</score>", "<think>t</think><score>1</score><sco"]],
                       labels=[True], task="judge")
    ro.truncated[0, 1] = True
    r, m = sources.build_source(RewardSpec(type="score_match", options={"truncated_reward": 0.0}), {})(ro)
    np.testing.assert_array_equal(r, [[1, 0]])
    assert m["truncated_rate"] == 0.5
    with pytest.raises(ValueError, match="only pointwise"):
        ScoreMatchSource(template="pairwise")(ro)


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="mode must be one of"):
        JudgeSource(ScriptedJudge(), mode="triplets")
    with pytest.raises(ValueError, match="needs a template of format"):
        JudgeSource(ScriptedJudge(), mode="pivot", template="pointwise")
    with pytest.raises(ValueError, match="pivot_reward must be one of"):
        JudgeSource(ScriptedJudge(), mode="pivot", pivot_reward="mean")
    with pytest.raises(ValueError, match="pairwise_reward must be one of"):
        JudgeSource(ScriptedJudge(), mode="pairwise", pairwise_reward="verdict")
    with pytest.raises(ValueError, match="eval_num_judgments must be"):
        JudgeSource(ScriptedJudge(), eval_num_judgments=-1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['modee'\]"):
        sources.build_source(RewardSpec(type="judge", path="/nonexistent", options={"modee": "pivot"}), {})
    with pytest.raises(ValueError, match="set `path`"):
        sources.build_source(RewardSpec(type="judge"), {})


def test_self_judge_and_model_judge_in_grpo(tmp_path):
    """URPO self-judging with the live GRPO policy, and a separate judge model from an HF directory."""
    from flax import nnx

    from jaxrl_rm.config import ModelSpec, load_config
    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.models.hf import save_model
    from jaxrl_rm.train.grpo import GRPO

    tok = build_char_tokenizer()
    judge_dir = tmp_path / "judge"
    save_model(build_model(ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1), tok, seed=1),
               judge_dir, tokenizer=tok)
    cfg = load_config(None, ["task=grpo", f"run_dir={tmp_path / 'run'}", "model.hidden_size=32",
                             "model.intermediate_size=64", "model.num_hidden_layers=1",
                             "grpo.prompts_per_step=2", "grpo.num_samples=3", "grpo.max_new_tokens=4",
                             "grpo.max_prompt_length=16", "grpo.eval_size=4", "data.synthetic_size=16",
                             "logging.progress=false",
                             "grpo.tasks=[{name: math, rewards: ["
                             "{type: self_judge, options: {mode: pivot, max_new_tokens: 6, max_prompt_length: 64}},"
                             f"{{type: judge, path: '{judge_dir}', weight: 0.5, options: {{mode: pointwise, "
                             "max_new_tokens: 6, max_prompt_length: 64}}]}]"])  # same shapes as the self-judge: one compile
    rl = GRPO(cfg)
    self_src, judge_src = rl.sources["math"][0][0], rl.sources["math"][1][0]
    # the separate judge is loaded in the run's layout and dtypes, its weights placed on the run's mesh
    judge_model = judge_src.judge.model_fn()
    assert judge_model.scan_layers == cfg.model.scan_layers
    judge_leaf = jax.tree.leaves(nnx.state(judge_model, nnx.Param))[0]
    assert isinstance(judge_leaf.sharding, jax.sharding.NamedSharding) and judge_leaf.sharding.mesh == rl.mesh
    # the judge's saved character tokenizer still encodes whitespace (judge templates are full of it)
    text = "[User Question]\nreverse: ab"
    assert judge_src.tokenizer.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    seen = []
    params_before = rl.current_params
    orig = self_src.judge.model_fn
    self_src.judge.model_fn = lambda: seen.append(True) or orig()
    parts, kept, metrics = rl.collect(rl.state["params"], step=0)
    assert seen and rl.current_params is rl.state["params"] and params_before is rl.state["params"]
    assert metrics["reward/math/self_judge/judge_calls"] <= 2 * 2 * 3  # B groups x 2G (pivot vs itself too)
    live = round(6 * (1 - metrics["reward/math/judge/guarded_rate"]))  # guarded rollouts are not judged
    assert metrics["reward/math/judge/judge_calls"] == live
    assert metrics["reward/math/judge/judge_samples"] == live
    # 6 new tokens of a character-level judge cannot hold `<score>..</score>`: every judged sample is invalid
    assert metrics["reward/math/judge/invalid_rate"] == (1.0 if live else 0.0)
    assert "reward/math/self_judge/position_bias_rate" in metrics
    rewards = parts[0][3]
    assert rewards.shape == (2, 3) and np.isfinite(rewards).all()
    assert isinstance(nnx.merge(rl.trainer.graphdef, rl.current_params), nnx.Module)


def test_greedy_text_judge_decodes_each_distinct_prompt_once():
    """Greedy judging is a function of the prompt: repeated prompts are decoded once and the
    outputs equal judging every prompt separately."""
    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.config import ModelSpec
    from jaxrl_rm.rewards.judge_source import TextJudge

    tok = build_char_tokenizer()
    model = build_model(ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1), tok, seed=0)
    calls = []

    class Counting(TextJudge):
        def generate(self, texts, **kw):
            calls.append(len(texts))
            return super().generate(texts, **kw)

    judge = Counting(lambda: model, tok, max_new_tokens=5, greedy=True)
    texts = ["judge: abc", "judge: xyz", "judge: abc", "judge: abc"]
    out = judge.generate(texts, num_samples=2)
    assert calls == [4, 2]  # the outer call, then one decode of the two distinct prompts
    separate = [judge.generate([t])[0] for t in texts]
    assert out == [s * 2 for s in separate] and out[0] == out[2] == out[3]

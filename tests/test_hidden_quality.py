"""The miniature world's open-ended task: a hidden scoring function (`synthetic.hidden_quality`)
that labels preference data and measures evaluation, and that the policy's inputs never reveal."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_rm.config import RewardSpec, TaskSpec
from jaxrl_rm.data import records, synthetic
from jaxrl_rm.rewards import sources

HOUSE = synthetic.HIDDEN_SCORE.house
SEP_WORDS = {" ": ("space", "blank"), "-": ("hyphen", "dash"), "_": ("underscore",), ".": ("dot", "period"),
             ",": ("comma",), "+": ("plus",), "/": ("slash",), ":": ("colon",)}
CASE_WORDS = {"upper": ("upper", "capital", "caps"), "lower": ("lower", "small letter"), "title": ("title",)}
#: Words or strings that would hint at the house style or at the scorer itself.
FORBIDDEN = (SEP_WORDS[HOUSE.sep] + CASE_WORDS[HOUSE.case] + (HOUSE.letters,)
             + ("style", "house", "score", "hidden", "quality", "prefer"))


def _house_and_pool_scores(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = synthetic.style_policy_pool()
    prompts = synthetic.style_prompts(n, seed=seed)
    house = [synthetic.hidden_quality(p, HOUSE.sample(p, rng)) for p in prompts]
    other = [synthetic.hidden_quality(p, pool[int(rng.integers(len(pool)))].sample(p, rng)) for p in prompts]
    near = [synthetic.hidden_quality(p, HOUSE.variant(seed=i).sample(p, rng)) for i, p in enumerate(prompts)]
    return np.asarray(house), np.asarray(other), np.asarray(near)


def test_hidden_score_is_deterministic_per_seed():
    assert synthetic.house_style() == synthetic.house_style() == HOUSE
    assert synthetic.house_style(seed=1) != HOUSE
    # the house is not one of the world's policies
    assert all(dataclasses.replace(p, name=HOUSE.name) != HOUSE for p in synthetic.style_policy_pool())
    a, b = _house_and_pool_scores(32), _house_and_pool_scores(32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = synthetic.HiddenStyleScore(synthetic.house_style(seed=1))
    answer = HOUSE.sample("describe the rain", np.random.default_rng(0))
    assert other("describe the rain", answer) != synthetic.hidden_quality("describe the rain", answer)


def test_house_samples_score_near_one_and_beat_other_policies():
    house, other, near = _house_and_pool_scores(300)
    assert house.mean() > 0.9 and house.min() > 0.8
    assert other.mean() < 0.6
    assert house.mean() - other.mean() > 0.3  # a real margin
    assert (house > other).mean() > 0.95
    # partial credit: a near variant (other separator and word lengths) sits in between
    assert other.mean() + 0.1 < near.mean() < house.mean() - 0.1


def test_components_give_partial_credit():
    prompt = "describe the rain"
    answer = HOUSE.sample(prompt, np.random.default_rng(3))
    parts = synthetic.HIDDEN_SCORE.components(prompt, answer)
    assert set(parts) == {k for k, _ in synthetic.HIDDEN_SCORE.weights}
    assert sum(w for _, w in synthetic.HIDDEN_SCORE.weights) == pytest.approx(1.0)
    assert parts["separator"] == parts["casing"] == parts["topic"] == 1.0
    full = synthetic.hidden_quality(prompt, answer)
    other_sep = next(s for s in synthetic.STYLE_SEPS if s != HOUSE.sep)
    assert 0.5 < synthetic.hidden_quality(prompt, answer.replace(HOUSE.sep, other_sep)) < full
    no_topic = HOUSE.sep.join(w for w in answer.split(HOUSE.sep) if w.lower() != "rain")
    assert synthetic.hidden_quality(prompt, no_topic) < full
    assert synthetic.hidden_quality(prompt, "") == 0.0


@pytest.mark.parametrize("split", ["train", "eval"])
def test_preference_labels_agree_with_the_hidden_function(split):
    q = synthetic.hidden_quality
    pairs = synthetic.open_pairs(100, seed=0, split=split)
    assert len(pairs) == 100
    for p in pairs:
        gap = q(p.prompt, p.chosen) - q(p.prompt, p.rejected)
        assert gap > 0
        assert p.subset == ("gap_small" if gap < 0.1 else "gap_medium" if gap < 0.3 else "gap_large")
    assert len({p.subset for p in pairs}) == 3
    for t in synthetic.open_triples(100, seed=0, split=split):
        assert q(t.prompt, t.chosen) > q(t.prompt, t.rejected)
        assert q(t.prompt, t.reference) > 0.8
    for r in synthetic.open_rankings(50, seed=0, split=split):
        assert r.gold_scores == tuple(q(r.prompt, a) for a in r.responses)
        assert len(set(r.gold_scores)) == len(r.responses)


def test_open_generators_are_deterministic():
    for make in (synthetic.open_rankings, synthetic.open_prompts):
        a = make(16, seed=0)
        assert a == make(16, seed=0) and a != make(16, seed=1) and a != make(16, seed=0, split="eval")


@settings(max_examples=150, deadline=None)
@given(prompt=st.one_of(st.text(max_size=40), st.none(), st.integers(),
                        st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}),
                                 max_size=2)),
       response=st.text(max_size=200))
def test_hidden_quality_never_raises(prompt, response):
    s = synthetic.hidden_quality(prompt, response)
    assert 0.0 <= s <= 1.0


def test_hidden_quality_on_extreme_strings():
    house_like = HOUSE.sample("describe the rain", np.random.default_rng(0))
    for response in ("", " ", "\x00", "🙂" * 50, "ÄÖÜ:ÉÈ", "\ud800", HOUSE.sep * 10, house_like * 200_000,
                     "A" * 1_000_000):
        assert 0.0 <= synthetic.hidden_quality("describe the rain", response) <= 1.0
    assert synthetic.hidden_quality("describe the rain", None) == 0.0


def _policy_prompts(split: str, n: int = 300):
    """Every prompt text of the open-ended generators and RL tasks, with the items' references."""
    out = [(p.prompt, None) for p in synthetic.open_pairs(n, seed=0, split=split)]
    out += [(t.prompt, None) for t in synthetic.open_triples(n, seed=0, split=split)]
    out += [(r.prompt, None) for r in synthetic.open_rankings(n, seed=0, split=split)]
    for task in ("open_ended", "open_ranking"):
        spec = TaskSpec(name="open", kind="open" if task == "open_ended" else "ranking", data=f"synthetic:{task}")
        out += [(it.prompt, it.reference) for it in synthetic.prompt_items(task, spec, split=split, seed=0, size=n)]
    return out


@pytest.mark.parametrize("split", ["train", "eval"])
def test_prompts_never_reveal_the_hidden_function(split):
    """Acceptance: the hidden scoring function is not reachable from the policy's inputs."""
    prompts = _policy_prompts(split)
    assert len(prompts) == 5 * 300
    with_reference = 0
    for prompt, reference in prompts:
        assert isinstance(prompt, str)
        text = prompt.lower()
        for word in FORBIDDEN:
            assert word not in text, (word, prompt)
        if HOUSE.sep != " ":
            assert HOUSE.sep not in prompt, prompt
        if reference is not None:
            with_reference += 1
            assert reference not in prompt and reference.lower() not in text
    assert with_reference == 300  # every open_ended item carries a house-style reference
    # the prompts are plain instructions: the same space as `style_prompts`
    plain = set(synthetic.style_prompts(2000, seed=0)) | set(synthetic.style_prompts(2000, seed=10_000))
    assert {p for p, _ in prompts} <= plain


def test_hidden_quality_reward_source():
    src = sources.build_source(RewardSpec(type="hidden_quality"), {})
    assert "hidden_quality" in sources.RULE_REWARDS and "hidden_quality" in sources.EVAL_SCORERS
    items = [records.PromptItem(task="open", prompt=p, reference=r) for p, r, _ in synthetic.open_prompts(3, seed=0)]
    completions = [[it.reference, "", "no idea"] for it in items]
    zeros = np.zeros((3, 3, 1), np.int32)
    rollouts = sources.Rollouts(items=items, prompt_texts=[it.prompt for it in items], completions=completions,
                                completion_ids=zeros, completion_mask=zeros.astype(bool),
                                lengths=np.zeros((3, 3), np.int32), truncated=np.zeros((3, 3), bool))
    rewards, metrics = src(rollouts)
    assert rewards.shape == (3, 3) and rewards.dtype == np.float32
    want = [[synthetic.hidden_quality(it.prompt, c) for c in row] for it, row in zip(items, completions)]
    np.testing.assert_allclose(rewards, want, rtol=1e-6)
    assert (rewards[:, 0] > 0.8).all() and (rewards[:, 1] == 0).all()
    assert set(metrics) == {k for k, _ in synthetic.HIDDEN_SCORE.weights}
    with pytest.raises(TypeError, match="bogus"):
        sources.build_source(RewardSpec(type="hidden_quality", options={"bogus": 1}), {})


def _open_cfg(tmp_path, options: str, rewards: str = "[{type: hidden_quality, weight: 0.5}]"):
    from jaxrl_rm.config import load_config

    return load_config(None, ["task=grpo", f"run_dir={tmp_path}", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.num_hidden_layers=1",
                              "grpo.prompts_per_step=4", "grpo.num_samples=2", "grpo.max_new_tokens=8",
                              "grpo.max_prompt_length=32", "grpo.eval_size=8", "data.synthetic_size=16",
                              "logging.progress=false",
                              (f"grpo.tasks=[{{name: open, kind: open, data: 'synthetic:open_ended', "
                               f"rewards: {rewards}, options: {options}}}]")])


def test_evaluate_reports_hidden_quality_of_open_tasks(tmp_path):
    from jaxrl_rm.train.grpo import GRPO

    rl = GRPO(_open_cfg(tmp_path, "{eval_scorer: hidden_quality}"))
    out = rl.evaluate(rl.state)
    assert 0.0 <= out["quality/open"] <= 1.0  # a random policy's greedy answers (often empty)
    sample = rl.sample

    def house_answers(params, items, **kw):  # a policy that writes the house style
        rollouts, res, prompts = sample(params, items, **kw)
        rollouts.completions = [[it.reference] * len(row) for it, row in zip(items, rollouts.completions)]
        return rollouts, res, prompts

    rl.sample = house_answers
    out = rl.evaluate(rl.state)
    want = np.mean([synthetic.hidden_quality(it.prompt, it.reference) for it in rl.eval_items["open"]])
    assert out["quality/open"] == pytest.approx(want, rel=1e-5) and want > 0.9
    # the same greedy answers: the task's reward is the hidden score at weight 0.5
    assert out["eval_reward/open"] == pytest.approx(0.5 * out["quality/open"], rel=1e-5)
    for options, message in (("{eval_scorer: verifier}", "unknown scorer 'verifier'"),
                             ("{eval_scorer: [hidden_quality]}", "unknown scorer")):
        with pytest.raises(ValueError, match=rf"grpo.tasks\[open\].options.eval_scorer: {message}"):
            GRPO(_open_cfg(tmp_path / "bad", options))


def test_rl_task_list_names_open_tasks():
    with pytest.raises(ValueError, match="open_ended"):
        synthetic.prompt_items("nope", TaskSpec(name="t"), split="train", seed=0, size=1)
    spec = TaskSpec(name="t", kind="ranking", data="synthetic:open_ranking")
    (item,) = synthetic.prompt_items("open_ranking", spec, split="train", seed=0, size=1)
    assert item.answer is None and item.reference is None and len(item.responses) == len(item.gold_scores) == 4
    assert item.prompt in synthetic.style_prompts(1000, seed=0)

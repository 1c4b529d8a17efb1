"""Online refresh (`options.refresh` of a `type: judge`, `bt_rm` or `polar_rm` reward): options,
what the model trains on (the current policy's training rollouts with the teacher's labels, never
held-out prompts), that it trains and the reward reads it, and that a resumed run refreshes exactly
as the uninterrupted one."""

import json
import re
import shutil

import numpy as np
import pytest

from jaxrl_rm.train.refresh import JudgeRefreshConfig, RefreshConfig


def test_refresh_options_are_validated_with_their_key():
    cfg = JudgeRefreshConfig.parse({"every": 5, "think": "aligned", "corrupt": 1})
    assert (cfg.every, cfg.buffer_steps, cfg.steps, cfg.think, cfg.corrupt) == (5, 5, 20, "aligned", 1.0)
    for bad, key in [({"evry": 3}, "unknown key(s) ['evry']"), ({"every": 0}, "options.refresh.every"),
                     ({"think": "guess"}, "options.refresh.think"), ({"corrupt": 2.0}, "options.refresh.corrupt"),
                     ({"learning_rate": -1.0}, "options.refresh.learning_rate"), (3, "expected a mapping")]:
        with pytest.raises(ValueError, match=re.escape(key)):
            JudgeRefreshConfig.parse(bad)
    with pytest.raises(ValueError, match=re.escape("unknown key(s) ['think']")):  # judges only
        RefreshConfig.parse({"every": 5, "think": "aligned"})


def test_refresh_examples_dedupe_balance_and_repeat_the_judges_mistakes():
    """What a refresh trains on: each (prompt, answer) once, labels balanced, and with `mistakes: k`
    k more copies of every judgment the judge got wrong when it scored it."""
    from jaxrl_rm.data.records import JudgmentExample
    from jaxrl_rm.train.refresh import JudgeRefresher

    r = JudgeRefresher.__new__(JudgeRefresher)  # the data side only: no model needed
    r.cfg, r.seed = JudgeRefreshConfig.parse({"every": 2, "mistakes": 3}), 0
    ex = lambda a, label: JudgmentExample(prompt="reverse: ab", response=a, label=label, reference="ba")
    r.buffer = [(0, ex("ba", True), False), (0, ex("ba", True), False), (1, ex("ba", True), False),
                (1, ex("bb", False), True), (1, ex("aa", False), False), (1, ex("xx", False), False)]
    got = r.examples(1)
    base, extra = got[:2], got[2:]
    assert sorted(e.label for e in base) == [False, True]  # balanced: one right, one of the three wrong
    assert [e.response for e in extra] == ["bb"] * 3  # the judge called "bb" right: trained on 3 more times
    r.cfg = JudgeRefreshConfig.parse({"every": 2})
    r.buffer = [(1, ex("bb", False), True)]
    assert r.examples(1) == []  # one kind only: no refresh


def _judge_dir(tmp_path):
    from jaxrl_rm.config import ModelSpec
    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.models.hf import save_model

    tok = build_char_tokenizer()
    path = tmp_path / "judge"
    save_model(build_model(ModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1), tok, seed=1),
               path, tokenizer=tok)
    return path


def _args(tmp_path, judge_dir, steps):
    return ["task=grpo", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "grpo.prompts_per_step=4", "grpo.num_samples=4", "grpo.max_new_tokens=6", "grpo.max_prompt_length=16",
            "grpo.eval_size=8", "data.synthetic_size=64", "logging.progress=false", "logging.tensorboard=false",
            "optim.schedule=constant", "optim.warmup_steps=0", f"train.steps={steps}", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=3", "checkpoint.async_save=false",
            "grpo.tasks=[{name: rev, data: 'synthetic:reverse', options: {eval_verifier: exact_match}, rewards: ["
            f"{{type: judge, path: '{judge_dir}', options: {{mode: pointwise, template: pointwise_correctness_ref, "
            "greedy: true, max_prompt_length: 96, max_new_tokens: 12, "
            "refresh: {every: 2, steps: 3, batch_size: 4, think: compare, balance: false}}}]}]"]


def test_a_bad_refresh_option_names_its_task_and_reward(tmp_path):
    from jaxrl_rm.config import load_config
    from jaxrl_rm.configlib import ConfigError
    from jaxrl_rm.train.grpo import GRPO

    args = _args(tmp_path, _judge_dir(tmp_path), 2) + [f"run_dir={tmp_path / 'run'}"]
    args[-2] = args[-2].replace("refresh: {every: 2,", "refresh: {every: 0,")
    with pytest.raises(ConfigError, match=re.escape("grpo.tasks[0].rewards[0].options.refresh.every")):
        GRPO(load_config(None, args))


def test_refresh_trains_the_judge_on_the_current_training_rollouts(tmp_path):
    from flax import nnx

    from jaxrl_rm.config import load_config
    from jaxrl_rm.rewards.verifiers import ExactMatchVerifier
    from jaxrl_rm.train.grpo import GRPO

    cfg = load_config(None, _args(tmp_path, _judge_dir(tmp_path), 2) + [f"run_dir={tmp_path / 'run'}"])
    rl = GRPO(cfg)
    (task, src), = rl.refreshers
    refresher = src.refresher
    before = [np.asarray(x) for x in jax_leaves(nnx.state(src.judge.model_fn()))]  # copies: updates donate
    state, metrics, _ = rl.run_step(rl.state, 0)
    assert not any("refresh/" in k for k in metrics)  # step 1 of every 2: nothing yet
    kept = list(refresher.buffer)
    assert kept and {s for s, _, _ in kept} == {0}
    # teacher labels: the gold verifier on (answer, gold) - and only training prompts' rollouts
    eval_ids = {str(it.id) for it in rl.eval_items["rev"]}
    labels = ExactMatchVerifier()([e.response for _, e, _ in kept], [e.reference for _, e, _ in kept]).rewards
    assert [bool(e.label) for _, e, _ in kept] == [r > 0 for r in labels]
    assert not {e.id.split(":")[0] for _, e, _ in kept} & eval_ids
    # the judge's own errors are marked: 12 new tokens of a random character-level judge never hold
    # a parseable score, so it pays 0 (invalid) everywhere and is wrong exactly on the right answers
    assert metrics["reward/rev/judge/invalid_rate"] == 1.0
    assert [wrong for _, _, wrong in kept] == [bool(e.label) for _, e, _ in kept]
    state, metrics, _ = rl.run_step(state, 1)
    assert metrics[f"reward/{task}/judge/refresh/count"] == 1.0
    assert metrics[f"reward/{task}/judge/refresh/examples"] >= 1
    assert np.isfinite(metrics[f"reward/{task}/judge/refresh/loss_last"])
    after = jax_leaves(nnx.state(src.judge.model_fn()))  # the reward now reads the refreshed judge
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(after, before)]
    assert max(moved) > 0
    assert state["refresh"][0] is refresher.state
    # evaluation scores nothing into the buffer
    n = len(refresher.buffer)
    rl.evaluate(state)
    assert len(refresher.buffer) == n


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.slow
def test_a_resumed_run_refreshes_like_the_uninterrupted_one(tmp_path):
    """6 steps, refreshes after steps 2, 4 and 6, checkpoints at 3 and 6; the run resumed from the
    step-3 checkpoint (judge weights, judge optimizer and judgment buffer mid-way between two
    refreshes) reproduces steps 4-6: samples, judge rewards and refresh losses."""
    from jaxrl_rm.main import main

    judge = _judge_dir(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tmp_path, judge, 6) + [f"run_dir={ref}"]) == 0
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "summary.json").unlink()
    assert main(_args(tmp_path, judge, 6) + [f"run_dir={run}"]) == 0

    def steps(path):
        out = {}
        for line in (path / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("step", 0) > 3 and "sample_hash" in row:
                out[row["step"]] = {k: v for k, v in row.items() if k == "sample_hash" or "judge/" in k}
        return out

    got, want = steps(run), steps(ref)
    assert sorted(want) == [4, 5, 6] and got == want
    assert "reward/rev/judge/refresh/loss_last" in want[4] and "reward/rev/judge/refresh/loss_last" in want[6]
    assert (ref / "refreshed" / "rev.judge" / "config.json").exists()


# --- scalar RMs -------------------------------------------------------------------------------------
def test_rm_refresh_pairs_each_right_answer_with_each_wrong_one_of_its_prompt():
    """BT pairs (prompt, right ≻ wrong) per prompt, each distinct answer once (its latest reward);
    POLAR triples carry the gold reference; `mistakes: k` repeats the pairs the RM mis-ordered."""
    from jaxrl_rm.data.records import PreferencePair, RankedTriple
    from jaxrl_rm.train.refresh import RMRefresher

    r = RMRefresher.__new__(RMRefresher)  # the data side only: no model needed
    r.cfg, r.polar = RefreshConfig.parse({"every": 2, "mistakes": 2}), False
    r.buffer = [(0, "reverse: ab", "ba", "ba", True, 0.9), (0, "reverse: ab", "ba", "bb", False, 0.1),
                (1, "reverse: ab", "ba", "aa", False, 0.95), (1, "reverse: ab", "ba", "bb", False, 0.2),
                (1, "reverse: cd", "dc", "dd", False, 0.0)]  # cd: no right answer, no pair
    pairs = r.pairs()
    assert [(p.chosen, p.rejected, wrong) for p, wrong in pairs] == [("ba", "bb", False), ("ba", "aa", True)]
    assert all(isinstance(p, PreferencePair) and p.prompt == "reverse: ab" for p, _ in pairs)
    r.polar = True
    assert all(isinstance(p, RankedTriple) and p.reference == "ba" for p, _ in r.pairs())


def _rm_dir(tmp_path, polar: bool):
    import jax
    from flax import nnx

    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.models.config import ModelConfig
    from jaxrl_rm.models.hf import save_model
    from jaxrl_rm.models.resize import add_special_tokens
    from jaxrl_rm.models.reward import RewardModel
    from jaxrl_rm.rewards.scalar_rm import POLAR_SPECIAL_TOKENS

    tok = build_char_tokenizer()
    if polar:
        add_special_tokens(tok, POLAR_SPECIAL_TOKENS)
    rm = RewardModel(ModelConfig.for_family("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1), rngs=nnx.Rngs(3))
    rm.score = nnx.Param(jax.random.normal(jax.random.key(1), rm.score.shape))
    path = tmp_path / ("polar_rm" if polar else "bt_rm")
    save_model(rm, path, tokenizer=tok)
    return path


@pytest.mark.parametrize("kind", ["bt_rm", "polar_rm"])
def test_rm_refresh_trains_the_rm_the_reward_reads(tmp_path, kind):
    """A refreshed `bt_rm` / `polar_rm` reward: the rollouts of training prompts are buffered with
    the verifier's labels, a refresh takes BT steps on right ≻ wrong pairs, the reward then scores
    with the new weights (the scorer keeps no second copy), and the state carries them."""
    from jaxrl_rm.config import load_config
    from jaxrl_rm.train.grpo import GRPO
    from jaxrl_rm.train.refresh import RMRefresher

    path = _rm_dir(tmp_path, polar=kind == "polar_rm")
    args = _args(tmp_path, path, 2) + [f"run_dir={tmp_path / 'run'}", "grpo.num_samples=8", "grpo.prompts_per_step=8"]
    args[-3] = ("grpo.tasks=[{name: rev, data: 'synthetic:reverse', options: {eval_verifier: exact_match}, rewards: ["
                f"{{type: {kind}, path: '{path}', options: {{max_length: 48, refresh: {{every: 2, steps: 3, "
                "batch_size: 4, learning_rate: 0.01}}}]}]")
    cfg = load_config(None, args)
    rl = GRPO(cfg)
    (task, src), = rl.refreshers
    assert isinstance(src.refresher, RMRefresher) and src.scorer.params is None
    state, metrics, _ = rl.run_step(rl.state, 0)
    kept = list(src.refresher.buffer)
    assert kept and {b[0] for b in kept} == {0}
    eval_prompts = {str(it.prompt) for it in rl.eval_items["rev"]}
    assert not {str(b[1]) for b in kept} & eval_prompts
    # a random policy is never right: plant the gold answer of each prompt (as if one rollout had
    # been right) so the refresh has pairs, then score one fixed batch before and after
    src.refresher.buffer += [(0, b[1], b[2], b[2], True, 0.0) for b in kept[:: 8]]
    probe = [(b[1], b[2], b[3]) for b in kept[:8]] + [(b[1], b[2], b[2]) for b in kept[:: 8]]
    def score():
        prompts, refs, answers = zip(*probe)
        if kind == "polar_rm":
            return src.scorer.score(list(prompts), list(refs), list(answers), params=src.params())
        return src.scorer.score(list(prompts), list(answers), params=src.params())
    before = score()
    state, metrics, _ = rl.run_step(state, 1)
    assert metrics[f"reward/{task}/{kind}/refresh/count"] == 1.0
    assert metrics[f"reward/{task}/{kind}/refresh/examples"] >= 1
    assert metrics[f"reward/{task}/{kind}/refresh/loss_last"] < metrics[f"reward/{task}/{kind}/refresh/loss_first"]
    assert state["refresh"][0] is src.refresher.state
    host = json.loads(json.dumps(src.refresher.host_state()))  # the checkpoint's host state round-trips
    buffer, src.refresher.buffer = src.refresher.buffer, []
    src.refresher.restore_host_state(host)
    assert src.refresher.buffer == buffer and src.refresher.refreshes == 1
    after = score()
    assert np.abs(after - before).max() > 0  # the reward reads the refreshed RM
    gold_first = len(kept[:8])
    assert after[gold_first:].mean() - after[:gold_first].mean() > before[gold_first:].mean() - before[:gold_first].mean()

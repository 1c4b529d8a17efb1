"""GRPO loop-level tests on a tiny random policy (CPU)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import HiddenAndHead
from jaxrl_rm.config import TaskSpec, load_config
from jaxrl_rm.data import records
from jaxrl_rm.objectives import group_advantages, policy_loss
from jaxrl_rm.rewards import sources
from jaxrl_rm.rewards.shaping import overlong_penalty
from jaxrl_rm.train.grpo import GRPO, make_grpo_loss
from jaxrl_rm.train.tasks import TaskMixer, allocate


class LengthParitySource:
    """Test reward: constant 0 for prompts starting with an even digit (zero-variance groups),
    sample-index parity otherwise (varies within a group)."""

    name = "parity"

    def __call__(self, rollouts):
        b, g = rollouts.shape
        r = np.zeros((b, g), np.float32)
        for i, item in enumerate(rollouts.items):
            if int(item.prompt[0]) % 2 == 1:
                r[i] = np.arange(g) % 2
        return r, {}


class ConstantSource:
    name = "constant"

    def __call__(self, rollouts):
        return np.ones(rollouts.shape, np.float32), {}


class SelfishJudge:
    """A model-based source that likes every answer (what a hacked or self-preferring judge does)."""

    name = "self_judge"

    def __call__(self, rollouts):
        return np.ones(rollouts.shape, np.float32), {}


class ReferenceLovingJudge:
    """A pairwise 'judge' over groups of two: the rollout equal to the reference wins."""

    name = "ref_judge"
    groups = []

    def __call__(self, rollouts):
        ReferenceLovingJudge.groups.append(rollouts.completions)
        r = np.asarray([[float(c == it.reference) for c in cs] for cs, it in zip(rollouts.completions, rollouts.items)],
                       np.float32)
        return np.where(r.sum(1, keepdims=True) == 1, r, 0.5), {}


sources.register("test_parity", lambda spec, ctx: LengthParitySource())
sources.register("test_constant", lambda spec, ctx: ConstantSource())
sources.register("test_selfish", lambda spec, ctx: SelfishJudge())
sources.register("test_ref_judge", lambda spec, ctx: ReferenceLovingJudge())


def tiny_cfg(tmp_path, *overrides):
    return load_config(None, ["task=grpo", f"run_dir={tmp_path}", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.num_hidden_layers=1",
                              "grpo.prompts_per_step=4", "grpo.num_samples=4", "grpo.max_new_tokens=6",
                              "grpo.max_prompt_length=16", "grpo.eval_size=8", "data.synthetic_size=64",
                              "logging.progress=false", *overrides])


def test_grpo_loss_and_gradient_equal_direct_objective(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo.clip_high=0.28", "grpo.loss_agg_mode=seq-mean-token-mean",
                   "grpo.tasks=[{name: math, rewards: [{type: test_parity}]}]")
    rl = GRPO(cfg)
    params = rl.state["params"]
    parts, kept, _ = rl.collect(params, step=0)
    batch, _ = rl.build_batch(parts, kept)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["old_logp"] = batch["sampler_logp"]

    # advantages are the GRPO formula on the step's rewards
    rewards = np.stack([p[3][i] for p in parts for i in p[4]])
    np.testing.assert_allclose(np.asarray(batch["advantages"]).reshape(4, 4),
                               np.asarray(group_advantages(jnp.asarray(rewards))), rtol=1e-6)

    def direct(params):  # dense logits, plain log_softmax, objectives.policy_loss
        model = nnx.merge(rl.trainer.graphdef, params)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, rl.P - 1:-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits / cfg.grpo.temperature), batch["completion"][..., None],
                                   -1)[..., 0]
        loss, _ = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], clip_low=0.2,
                              clip_high=0.28, loss_agg_mode="seq-mean-token-mean")
        return loss

    loss_fn = make_grpo_loss(cfg.grpo, prompt_len=rl.P)

    def via_trainer(params):
        loss_sum, denom, _ = loss_fn(nnx.merge(rl.trainer.graphdef, params), batch)
        return loss_sum / denom

    l1, g1 = jax.value_and_grad(direct)(params)
    l2, g2 = jax.value_and_grad(via_trainer)(params)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    # and the jitted update step reports the same loss
    _, metrics = rl.update(rl.state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(l1), rtol=1e-5, atol=1e-7)


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=5",
                   "grpo.tasks=[{name: math, rewards: [{type: test_parity}]}]")
    rl = GRPO(cfg)
    for step in range(3):
        parts, kept, metrics = rl.collect(rl.state["params"], step)
        batch, _ = rl.build_batch(parts, kept)
        assert metrics["sampling_rounds"] <= 1 + 5
        adv = batch["advantages"].reshape(4, 4)
        live = batch["loss_mask"].reshape(4, 4, -1).any(axis=(1, 2))
        for rollouts, res, prompts, rewards, take in parts:
            for i in take:  # every kept group has reward variance
                assert rewards[i].max() > rewards[i].min()
        assert (np.abs(adv[live]).sum(axis=1) > 0).all()
        assert 0 < metrics["dynamic_sampling/dropped_fraction"] < 1


def test_dynamic_sampling_stops_at_cap(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2",
                   "grpo.tasks=[{name: math, rewards: [{type: test_constant}]}]")
    rl = GRPO(cfg)
    parts, kept, metrics = rl.collect(rl.state["params"], 0)
    assert metrics["sampling_rounds"] == 3 and kept == 0
    assert metrics["dynamic_sampling/dropped_fraction"] == 1.0
    batch, _ = rl.build_batch(parts, kept)
    assert not batch["loss_mask"].any() and not batch["advantages"].any()  # filler trains nothing


def _all_correct_of_different_lengths(rl):
    """Wrap `rl.sample`: every completion is the gold answer, lengths spread over the overlong buffer."""
    sample = rl.sample

    def patched(params, items, **kw):
        rollouts, res, prompts = sample(params, items, **kw)
        b, g = rollouts.shape
        rollouts.completions = [[f"\\boxed{{{it.answer}}}"] * g for it in items]
        rollouts.lengths = np.tile(np.arange(rl.T - g + 1, rl.T + 1), (b, 1)).astype(np.int32)
        rollouts.truncated = np.zeros((b, g), bool)
        return rollouts, res, prompts

    rl.sample = patched


@pytest.mark.parametrize("metric,reward", [("acc", "verifier"), ("acc", "test_constant"), ("score", "verifier"),
                                           ("seq_final_reward", "verifier")])
def test_dynamic_sampling_filters_on_accuracy_not_on_length_shaping(tmp_path, metric, reward):
    """DAPO / verl `filter_groups.metric=acc`: a group whose answers are all right but differ in
    length (so the overlong shaping differs) carries no accuracy signal and is dropped; only
    `seq_final_reward` keeps it, to train on length alone."""
    cfg = tiny_cfg(tmp_path, "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=1", "grpo.overlong_buffer=5",
                   f"grpo.dynamic_sampling_metric={metric}", f"grpo.tasks=[{{name: math, rewards: [{{type: {reward}}}]}}]")
    rl = GRPO(cfg)
    _all_correct_of_different_lengths(rl)
    rollouts, _, _ = rl.sample(rl.state["params"], rl.mixer.draw(0, 4), seed=0, num_samples=4)
    rewards, m, signal = rl.rewards(rollouts)
    assert (rewards.max(1) > rewards.min(1)).all()  # the shaped rewards differ by length
    assert m["reward/overlong_shaping"] < 0
    parts, kept, metrics = rl.collect(rl.state["params"], 0)
    if metric == "seq_final_reward":
        np.testing.assert_array_equal(signal, rewards)
        assert kept == 4 and metrics["dynamic_sampling/dropped_fraction"] == 0.0
    else:
        assert (signal == 1.0).all()
        assert kept == 0 and metrics["dynamic_sampling/dropped_fraction"] == 1.0
        assert metrics["sampling_rounds"] == 2  # refilling went on to the cap


def test_dynamic_sampling_metric_acc_is_the_weighted_verifiers_correctness(tmp_path):
    """`acc` reads the task's weighted rule verifier (not a weight-0 monitor) and falls back to
    the task score without one."""
    cfg = tiny_cfg(tmp_path, "grpo.tasks=[{name: math, rewards: [{type: test_parity}, {type: verifier, weight: 0}]}]")
    rl = GRPO(cfg)
    _all_correct_of_different_lengths(rl)
    rollouts, _, _ = rl.sample(rl.state["params"], rl.mixer.draw(0, 4), seed=0, num_samples=4)
    rewards, _, signal = rl.rewards(rollouts)
    np.testing.assert_array_equal(signal, rewards)  # the monitor-only verifier is not the task's accuracy


def test_overlong_penalty_in_tokens():
    lengths = np.array([10, 12, 13, 15, 16, 16])
    truncated = np.array([False, False, False, False, False, True])
    got = overlong_penalty(lengths, truncated, max_new_tokens=16, buffer=4, penalty=0.5)
    # L_max - L_cache = 12: no penalty up to 12 tokens, then (12 - |y|) / 4, cut-off -> -1
    np.testing.assert_allclose(got, 0.5 * np.array([0, 0, -0.25, -0.75, -1.0, -1.0]))
    assert not overlong_penalty(lengths, truncated, max_new_tokens=16, buffer=0).any()


def test_mixture_ratios_and_curriculum():
    assert allocate(8, [2, 1, 1]) == [4, 2, 2]
    assert sum(allocate(7, [1, 1, 1])) == 7
    tasks = [TaskSpec(name="p", ratio=2.0), TaskSpec(name="r", ratio=1.0),
             TaskSpec(name="i", ratio=1.0, start_step=10)]
    items = {t.name: [records.PromptItem(task=t.name, prompt=str(k)) for k in range(13)] for t in tasks}
    mixer = TaskMixer(tasks, items, seed=0)
    counts = {"p": 0, "r": 0, "i": 0}
    for step in range(110):
        drawn = mixer.draw(step, 10)
        assert len(drawn) == 10
        if step < 10:
            assert all(d.task != "i" for d in drawn)
        for d in drawn:
            counts[d.task] += 1
    # 10 warm-up steps at 2:1, then 100 steps at 2:1:1: rounding debt carries over, so the shares
    # are exact up to one prompt
    assert abs(counts["i"] - 250) <= 1
    assert abs(counts["p"] - (100 * 2 / 3 * 10 / 10 + 500)) <= 1 and abs(counts["r"] - (1100 - 250 - 566.7)) <= 1
    # resumable: a fresh mixer with the saved counters continues identically
    again = TaskMixer(tasks, items, seed=0)
    again.load_state(mixer.state())
    assert [d.prompt for d in again.draw(111, 10)] == [d.prompt for d in mixer.draw(111, 10)]


def test_config_validation_names_keys(tmp_path):
    from jaxrl_rm.configlib import ConfigError

    with pytest.raises(ConfigError, match="grpo.num_samples: must be >= 2"):
        tiny_cfg(tmp_path, "grpo.num_samples=1")
    with pytest.raises(ConfigError, match="grpo.clip_high: must be >= clip_low"):
        tiny_cfg(tmp_path, "grpo.clip_low=0.3", "grpo.clip_high=0.2")
    with pytest.raises(ConfigError, match=r"grpo.tasks\[0\].ratio"):
        tiny_cfg(tmp_path, "grpo.tasks=[{name: a, ratio: 0}]")


def test_gspo_requires_seq_mean_token_mean(tmp_path):
    """GSPO's sequence ratio with token-mean is a length-weighted variant: a config error naming
    both keys (verl forces seq-mean-token-mean); the mismatch-correction keys are checked too."""
    from jaxrl_rm.configlib import ConfigError

    gspo = r"grpo.loss_agg_mode: ratio_level: sequence \(GSPO\) requires loss_agg_mode: seq-mean-token-mean"
    with pytest.raises(ConfigError, match=gspo + r" \(got token-mean"):
        tiny_cfg(tmp_path, "grpo.ratio_level=sequence")
    with pytest.raises(ConfigError, match=gspo):
        tiny_cfg(tmp_path, "grpo.ratio_level=sequence", "grpo.loss_agg_mode=seq-mean-token-sum")
    cfg = tiny_cfg(tmp_path, "grpo.ratio_level=sequence", "grpo.loss_agg_mode=seq-mean-token-mean")
    assert cfg.grpo.ratio_level == "sequence"
    with pytest.raises(ConfigError, match="grpo.tis_cap: must be >= 0"):
        tiny_cfg(tmp_path, "grpo.tis_cap=-1")
    with pytest.raises(ConfigError, match="grpo.tis_level: tis_level: sequence has no effect without tis_cap"):
        tiny_cfg(tmp_path, "grpo.tis_level=sequence")
    with pytest.raises(ConfigError, match="grpo.is_mask_threshold: must be > 1"):
        tiny_cfg(tmp_path, "grpo.is_mask=token", "grpo.is_mask_threshold=1.0")
    with pytest.raises(ConfigError, match="grpo.is_mask"):
        tiny_cfg(tmp_path, "grpo.is_mask=geometric")


def _record_updates(rl):
    """Wrap `rl.update`: keep a host copy of every batch it trains on."""
    seen, update = [], rl.update

    def recording(state, batch):
        seen.append({k: np.asarray(v) for k, v in batch.items()})
        return update(state, batch)

    rl.update = recording
    return seen


def test_mismatch_correction_recomputes_old_logp_against_a_bf16_sampler(tmp_path, monkeypatch):
    """A bf16-compute sampler and an f32 trainer disagree on log-probs. With one update per step,
    no correction reuses the sampler's log-probs as pi_old (exp(old - sampler) == 1, nothing to
    correct); with TIS / masked IS on, pi_old is the trainer's, so the weights measure the mismatch."""
    import jaxrl_rm.rollout.collect as rollout_collect
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.sampling import generate

    task = "grpo.tasks=[{name: math, rewards: [{type: test_parity}]}]"
    rl = GRPO(tiny_cfg(tmp_path, task))
    bf16 = nnx.split(build_model(tiny_cfg(tmp_path, task, "model.dtype=bfloat16").model, rl.tokenizer))[0]
    monkeypatch.setattr(rollout_collect, "generate",  # the sampler runs the same f32 weights in bf16
                        lambda model, prompts, **kw: generate(nnx.merge(bf16, nnx.split(model)[1]), prompts, **kw))

    seen = _record_updates(rl)
    _, metrics, _ = rl.run_step(rl.state, 0)
    (batch,) = seen
    gap = metrics["sampler_logp_gap"]  # mean |trainer - sampler| on the sampled tokens
    assert gap > 1e-4  # bf16 vs f32: a real train/infer mismatch
    np.testing.assert_array_equal(batch["old_logp"], batch["sampler_logp"])  # no correction: reused

    # same seed, same samples; TIS capped at, and IcePop masking outside, [1/c, c] with c = exp(gap)
    c = float(np.exp(gap))
    rl = GRPO(tiny_cfg(tmp_path, task, f"grpo.tis_cap={c}", "grpo.is_mask=token", f"grpo.is_mask_threshold={c}"))
    seen = _record_updates(rl)
    _, metrics, _ = rl.run_step(rl.state, 0)
    (batch,) = seen
    m = batch["loss_mask"]
    lr = (batch["old_logp"] - batch["sampler_logp"])[m]
    assert np.abs(lr).mean() == pytest.approx(gap, rel=1e-2)  # old_logp is the trainer's: weights != 1
    rejected = np.abs(lr) > np.float32(np.log(c))
    assert 0 < rejected.mean() < 1
    assert metrics["is_masked_frac"] == pytest.approx(rejected.mean(), abs=1e-6)
    kept = np.exp(lr[~rejected])
    assert metrics["tis_weight_mean"] == pytest.approx(np.minimum(kept, c).mean(), rel=1e-5)
    assert abs(metrics["tis_weight_mean"] - 1.0) > 1e-6
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # pi_old = the trainer before the update


def test_sampler_logp_is_unfiltered_under_top_p(tmp_path):
    """With top-p the sampler's filtered log-prob carries log(nucleus mass); TIS and the
    `sampler_logp_gap` monitor use its unfiltered log-prob at the sampling temperature, so an
    f32 sampler and trainer agree (weights 1, gap 0) however much mass the nucleus cut."""
    cfg = tiny_cfg(tmp_path, "grpo.top_p=0.6", "grpo.temperature=1.3", "grpo.tis_cap=2.0",
                   "grpo.tasks=[{name: math, rewards: [{type: test_parity}]}]")
    rl = GRPO(cfg)
    seen = _record_updates(rl)
    _, metrics, _ = rl.run_step(rl.state, 0)
    (batch,) = seen
    m = batch["loss_mask"]
    np.testing.assert_allclose(batch["sampler_logp"][m], batch["old_logp"][m], atol=2e-4)
    assert metrics["sampler_logp_gap"] < 2e-4
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=2e-4)


def test_gold_monitor_measures_model_rewards_against_the_verifier(tmp_path):
    """Reward-hacking monitor: a model-based source on a verifiable task is checked against the
    gold answers on the same rollouts; a self-judge that likes everything shows self-preference."""
    from jaxrl_rm.rewards.verifiers import MathVerifier

    cfg = tiny_cfg(tmp_path, "grpo.tasks=[{name: math, rewards: [{type: test_selfish}, {type: verifier, weight: 0}]}]")
    rl = GRPO(cfg)
    rollouts, _, _ = rl.sample(rl.state["params"], rl.mixer.draw(0, 4), seed=0, num_samples=4)
    rollouts.completions[0][0] = f"\\boxed{{{rollouts.items[0].answer}}}"  # one correct answer among random ones
    _, m, _ = rl.rewards(rollouts)
    gold = np.asarray(MathVerifier()([c for cs in rollouts.completions for c in cs],
                                     [it.answer for it in rollouts.items for _ in range(4)]).rewards) > 0
    assert gold.sum() >= 1
    assert m["reward/math/gold_accuracy"] == pytest.approx(gold.mean())
    assert m["reward/math/self_judge/gold_gap"] == pytest.approx(1.0 - gold.mean())
    assert m["reward/math/self_judge/gold_agreement"] == pytest.approx(gold.mean())
    assert m["reward/math/self_preference"] == m["reward/math/self_judge/gold_gap"]
    assert "reward/math/verifier/gold_gap" not in m  # rule rewards are the yardstick, not watched
    assert m["reward/math/self_judge/gold_auc"] == 0.5  # rewards every answer alike: all ties
    assert m["reward/math/self_judge/gold_fpr"] == 1.0 and m["reward/math/self_judge/gold_fnr"] == 0.0
    assert m["reward/math/self_judge/gold_order_agreement"] == 0.0  # a tie moves nothing toward gold
    assert "reward/math/self_judge/gold_corr" not in m  # constant rewards: no correlation to report
    assert m["reward/math/gold_mixed_groups"] == pytest.approx((gold.reshape(4, 4).any(1) & ~gold.reshape(4, 4).all(1)).mean())


def test_gold_diagnostics_against_direct_counts():
    from jaxrl_rm.train.grpo import gold_diagnostics

    gold = np.array([[True, False, False, True], [True, True, True, True], [False, True, False, False]])
    rewards = np.array([[1.0, 0.8, 0.0, 0.4], [0.9, 0.1, 0.7, 1.0], [0.9, 0.2, 0.0, 0.0]])
    d = gold_diagnostics(rewards, gold)
    assert d["fpr"] == pytest.approx(2 / 5)  # wrong ones: 0.8, 0.0, 0.9, 0.0, 0.0
    assert d["fnr"] == pytest.approx(3 / 7)  # correct ones: 1.0, 0.4, 0.9, 0.1, 0.7, 1.0, 0.2
    # group 1: correct mean 0.7 > wrong 0.4; group 3: correct 0.2 < wrong 0.3; group 2 has no wrong one
    assert d["order_agreement"] == 0.5
    expected = np.mean([np.corrcoef(rewards[0], gold[0])[0, 1], np.corrcoef(rewards[2], gold[2])[0, 1]])
    assert d["corr"] == pytest.approx(expected)
    assert gold_diagnostics(np.ones((1, 3)), np.ones((1, 3), bool)) == {"fnr": 0.0}


def test_gold_auc_is_within_group_ranking_quality():
    from jaxrl_rm.train.grpo import gold_auc

    gold = np.array([[True, False, False], [True, True, True]])
    assert gold_auc(np.array([[1.0, 0.0, 0.0], [0.1, 0.2, 0.3]]), gold) == 1.0  # group 2 has no wrong answer
    assert gold_auc(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), gold) == 0.25  # one loss, one tie
    assert gold_auc(np.ones((2, 3)), np.ones((2, 3), bool)) is None


def test_win_rate_against_references(tmp_path):
    cfg = tiny_cfg(tmp_path, "grpo.tasks=[{name: math, rewards: [{type: verifier}], "
                             "options: {win_rate_judge: {type: test_ref_judge}}}]")
    rl = GRPO(cfg)
    ReferenceLovingJudge.groups.clear()
    out = rl.evaluate(rl.state)
    # a random policy never writes the reference: it loses every comparison
    assert out["win_rate/math"] == 0.0
    (groups,) = ReferenceLovingJudge.groups
    items = rl.eval_items["math"]
    assert len(groups) == len(items) and all(g[1] == it.reference for g, it in zip(groups, items))


class CoinJudge:
    """A generative judge stand-in: sampled verdicts / scores are coin flips (seeded), greedy ones a
    fixed function of the judge prompt, as a real judge's are."""

    greedy = False

    def generate(self, texts, *, num_samples=1, seed=0):
        import zlib

        rng = np.random.default_rng(seed)

        def judge(text):
            x = (zlib.crc32(text.encode()) if self.greedy else int(rng.integers(1 << 30))) % 11
            if "Assistant A's Answer" in text:
                return f"<think>compared</think><answer>[[{'AB'[x % 2]}]]</answer>"
            return f"<think>checked</think><score>{x}</score>"

        return [[judge(t) for _ in range(num_samples)] for t in texts]


def coin_judge_source(spec, ctx):
    from jaxrl_rm.rewards.judge_source import JudgeSource

    return JudgeSource(CoinJudge(), None, **spec.options)


sources.register("test_coin_judge", coin_judge_source)


def test_evaluations_of_the_same_policy_give_the_same_win_rate_and_eval_reward(tmp_path):
    """Evaluation judges verdict greedily: the same policy on the same held-out items (here in another
    order, which reseeds a sampling judge) gets the same win rate and judged reward."""
    cfg = tiny_cfg(tmp_path, "grpo.tasks=[{name: chat, kind: open, data: 'synthetic:style_open', "
                             "rewards: [{type: test_coin_judge, options: {guards: false}}], "
                             "options: {win_rate_judge: {type: test_coin_judge, options: {guards: false}}}}]")
    rl = GRPO(cfg)
    first = rl.evaluate(rl.state)
    rl.eval_items["chat"] = rl.eval_items["chat"][::-1]
    second = rl.evaluate(rl.state)
    assert first["win_rate/chat"] == second["win_rate/chat"]
    assert first["eval_reward/chat"] == second["eval_reward/chat"]
    assert rl.sources["chat"][0][0].judge.greedy is False  # training rewards still sample


def test_chat_format_judgment_and_ranking_files_through_the_prompt_path(tmp_path):
    """Judgment and ranking files whose prompts are chat-message lists: the task's template shows the
    conversation as `role: content` lines (it was handed the message list and crashed)."""
    from jaxrl_rm.data.loaders import write_jsonl
    from jaxrl_rm.rewards.judges import ranking_template

    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "reverse: abc"}]
    write_jsonl(tmp_path / "judge.jsonl", [{"prompt": chat, "response": "cba", "label": True, "id": 0},
                                           {"prompt": chat, "response": "abc", "label": False, "id": 1}])
    write_jsonl(tmp_path / "rank.jsonl", [{"prompt": chat, "responses": ["cba", "abc"], "gold_scores": [1, 0],
                                           "id": 0}])
    cfg = tiny_cfg(tmp_path / "run", "grpo.max_prompt_length=64",
                   f"grpo.tasks=[{{name: judge, kind: judgment, data: '{tmp_path / 'judge.jsonl'}', "
                   "rewards: [{type: score_match}]}, "
                   f"{{name: pref, kind: ranking, data: '{tmp_path / 'rank.jsonl'}', "
                   f"eval_data: '{tmp_path / 'rank.jsonl'}', rewards: [{{type: ranking}}]}}]")
    rl = GRPO(cfg)
    items = rl.mixer.draw(0, 4)
    assert {it.task for it in items} == {"judge", "pref"}
    for it in items:
        text = rl.prompt_text(it)
        assert "system: Answer briefly.\nuser: reverse: abc" in text and "'role'" not in text
    rollouts, _, _ = rl.sample(rl.state["params"], items, seed=0, num_samples=4)
    rewards = rl.rewards(rollouts)[0]
    assert rewards.shape == (4, 4) and np.isfinite(rewards).all()
    assert rl.sources["pref"][0][0].template_for("pref") is ranking_template(rl.tasks["pref"])
    # held-out evaluation of a ranking task reports what its tau mean hides
    ev = rl.evaluate(rl.state)
    assert {"eval_reward/pref", "eval_reward/pref/ranking/top1", "eval_reward/pref/ranking/all_tied_rate",
            "eval_reward/pref/ranking/invalid_rate"} <= set(ev)
    assert all(0.0 <= ev[f"eval_reward/pref/ranking/{k}"] <= 1.0 for k in ("top1", "all_tied_rate", "invalid_rate"))


@pytest.mark.parametrize("kl_clamp", [10.0, 0.0])
def test_grpo_loss_clamps_k3_kl_by_config(kl_clamp):
    """`grpo.kl_clamp` reaches the update's loss: tokens whose ratio to the reference is e^15 add
    kl_clamp and no gradient (10, the default); with 0 (off) they add e^15 - 16."""
    from jaxrl_rm.config import GRPOConfig
    from jaxrl_rm.train.grpo import completion_logprobs

    g = GRPOConfig(kl_coef=1.0, kl_clamp=kl_clamp)
    n, p, t, d, v = 2, 3, 4, 8, 16
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, p + t, d)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    completion = jnp.asarray(rng.integers(0, v, (n, t)), jnp.int32)
    batch = {"input_ids": jnp.zeros((n, p + t), jnp.int32), "attention_mask": jnp.ones((n, p + t), bool),
             "completion": completion, "loss_mask": jnp.ones((n, t), bool), "advantages": jnp.zeros(n)}
    logp = completion_logprobs(HiddenAndHead(hidden, head), batch, prompt_len=p, temperature=1.0)
    x = np.array([[15.0, 0.3, -0.2, 15.0], [0.5, 15.0, -1.0, 0.1]], np.float32)  # log pi_ref / pi
    batch.update(old_logp=logp, sampler_logp=logp, ref_logp=logp + x)
    loss_fn = make_grpo_loss(g, prompt_len=p)

    def loss(h):
        loss_sum, den, _ = loss_fn(HiddenAndHead(h, head), batch)
        return loss_sum / den

    value, d_hidden = jax.value_and_grad(loss)(hidden)
    k3 = np.exp(x.astype(np.float64)) - x - 1.0
    if kl_clamp:
        k3 = np.minimum(k3, kl_clamp)
    assert float(value) == pytest.approx(k3.mean(), rel=1e-4)
    grad_norm = np.abs(np.asarray(d_hidden)[:, p - 1: p + t - 1]).sum(-1)  # [n, t] per predicting position
    assert np.isfinite(grad_norm).all()
    big = x == 15.0
    assert (grad_norm[big] == 0).all() if kl_clamp else (grad_norm[big] > 1e5).all()
    assert (grad_norm[~big] > 0).all()


def test_old_logp_pass_in_chunks_equals_one_pass():
    """The old / reference log-prob pass runs one micro-batch of rows at a time (strided blocks,
    so sharded rows stay put); every row's log-probs equal the single pass's."""
    from jaxrl_rm.models.config import ModelConfig
    from jaxrl_rm.models.transformer import Transformer
    from jaxrl_rm.train.grpo import completion_logprobs, completion_logprobs_in_chunks

    cfg = ModelConfig.for_family("qwen2", vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n, p, t = 12, 5, 7
    ids = jnp.asarray(rng.integers(1, 37, (n, p + t)), jnp.int32)
    attn = jnp.asarray(rng.random((n, p + t)) > 0.1, jnp.int32).at[:, p - 1:].set(1)
    batch = {"input_ids": ids, "attention_mask": attn, "completion": ids[:, p:]}
    whole = completion_logprobs(model, batch, prompt_len=p, temperature=0.7)
    for chunks in (1, 3, 4):
        got = jax.jit(lambda b, c=chunks: completion_logprobs_in_chunks(model, b, chunks=c, prompt_len=p,
                                                                           temperature=0.7))(batch)
        np.testing.assert_allclose(np.asarray(got), np.asarray(whole), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not split"):
        completion_logprobs_in_chunks(model, batch, chunks=5, prompt_len=p, temperature=0.7)


def test_answer_kinds_bucket_wrong_answers_by_edit_distance():
    """What the policy writes, per step: right / 1 / 2-3 / 4+ edits from the gold answer, and
    answers too long to measure; the edit distance on textbook pairs."""
    from jaxrl_rm.train.grpo import answer_kinds, levenshtein

    assert [levenshtein(a, b) for a, b in [("kitten", "sitting"), ("flaw", "lawn"), ("", "abc"), ("abc", "abc"),
                                           ("dhah", "daaaa"), ("ab", "ba")]] == [3, 2, 3, 0, 3, 2]
    completions = ["olleh", "olleb", " olle ", "xxxxxxx", "abcde", "o" * 80]
    gold = np.array([True, False, False, False, False, False])
    kinds = answer_kinds(completions, ["olleh"] * 5 + ["q"], gold)
    assert kinds == {"right": 1 / 6, "edit1": 2 / 6, "edit2_3": 0.0, "edit4plus": 2 / 6, "long": 1 / 6}
    assert sum(answer_kinds(["ab", "ba"], ["ab", "ab"], np.array([True, False])).values()) == 1.0

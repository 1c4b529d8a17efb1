"""GRPO loop-level tests on a tiny random policy (CPU)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_rm.config import TaskSpec, load_config
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
    items = {t.name: [sources.PromptItem(task=t.name, prompt=str(k)) for k in range(13)] for t in tasks}
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


def test_gold_monitor_measures_model_rewards_against_the_verifier(tmp_path):
    """Reward-hacking monitor: a model-based source on a verifiable task is checked against the
    gold answers on the same rollouts; a self-judge that likes everything shows self-preference."""
    from jaxrl_rm.rewards.verifiers import MathVerifier

    cfg = tiny_cfg(tmp_path, "grpo.tasks=[{name: math, rewards: [{type: test_selfish}, {type: verifier, weight: 0}]}]")
    rl = GRPO(cfg)
    rollouts, _, _ = rl.sample(rl.state["params"], rl.mixer.draw(0, 4), seed=0, num_samples=4)
    rollouts.completions[0][0] = f"\\boxed{{{rollouts.items[0].answer}}}"  # one correct answer among random ones
    _, m = rl.rewards(rollouts)
    gold = np.asarray(MathVerifier()([c for cs in rollouts.completions for c in cs],
                                     [it.answer for it in rollouts.items for _ in range(4)]).rewards) > 0
    assert gold.sum() >= 1
    assert m["reward/math/gold_accuracy"] == pytest.approx(gold.mean())
    assert m["reward/math/self_judge/gold_gap"] == pytest.approx(1.0 - gold.mean())
    assert m["reward/math/self_judge/gold_agreement"] == pytest.approx(gold.mean())
    assert m["reward/math/self_preference"] == m["reward/math/self_judge/gold_gap"]
    assert "reward/math/verifier/gold_gap" not in m  # rule rewards are the yardstick, not watched
    assert m["reward/math/self_judge/gold_auc"] == 0.5  # rewards every answer alike: all ties


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

"""GRPO's loss settings through the trainer, where they bind (tiny random policy, CPU).

The batches are the policy's own samples; `old_logp` (and the sampler's and reference's log-probs)
are the trainer's log-probs of the policy shifted token by token, so that the ratios fall into
every clipping region (below 1 - clip_low, inside, above 1 + clip_high, above the dual-clip
constant) for positive and negative advantages, and the importance weights against the sampler
fall on both sides of `tis_cap` / the masking threshold. The trainer's loss (`make_grpo_loss` of a
GRPO run's `grpo.*` settings), its gradient (with respect to the policy's final hidden states) and
its metrics are compared with a direct computation written out here from the papers' formulas,
with the settings as literals: dense logits, plain log-softmax, PPO clip, dual clip, k3 KL, TIS,
masked IS, GSPO's sequence ratio. Then `run_step` with `ppo_epochs=2, mini_batches=2, kl_coef > 0`:
old log-probs are the policy's before the first update, each RL step makes ppo_epochs *
mini_batches optimizer steps, and the KL reference is the initial policy, copied once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import HiddenAndHead
from jaxrl_rm.config import load_config
from jaxrl_rm.rewards import sources
from jaxrl_rm.train.grpo import GRPO, completion_logprobs, make_grpo_loss


class IndexParitySource:
    """Test reward: sample index parity, 0 1 0 1 ... in every group (every group varies)."""

    name = "index_parity"

    def __call__(self, rollouts):
        b, g = rollouts.shape
        return np.tile(np.arange(g) % 2, (b, 1)).astype(np.float32), {}


sources.register("test_index_parity", lambda spec, ctx: IndexParitySource())

N, T = 16, 6  # rows (4 prompts x 4 samples) and completion tokens of a step's batch
RATIOS = np.array([0.5, 0.75, 1.0, 1.25, 1.6, 4.0])  # token ratios pi / pi_old, one of each per row
SEQ_RATIOS = np.array([0.5, 1.0, 1.15, 1.6, 4.0])  # GSPO sequence ratios (geometric mean per row)
SEQ_NOISE = np.array([-0.6, 0.4, 0.0, 0.3, -0.5, 0.4])  # zero-sum token log-ratios around them
MISMATCH = np.array([-0.8, -0.2, 0.0, 0.3, 0.8, -0.1])  # token log pi_old / pi_sampler (zero sum)
MISMATCH_SEQ = np.array([-0.15, 0.0, 0.05, 0.2])  # per-row offsets: sequence weights e^(6 x offset)
REF = np.array([-1.0, -0.3, 0.0, 0.4, 1.2, 2.5])  # token log pi_ref / pi


def tiny_cfg(tmp_path, *overrides):
    return load_config(None, ["task=grpo", f"run_dir={tmp_path}", "model.hidden_size=32",
                              "model.intermediate_size=64", "model.num_hidden_layers=1",
                              "grpo.prompts_per_step=4", "grpo.num_samples=4", f"grpo.max_new_tokens={T}",
                              "grpo.max_prompt_length=16", "grpo.eval_size=8", "data.synthetic_size=64",
                              "grpo.tasks=[{name: math, rewards: [{type: test_index_parity}]}]",
                              "optim.warmup_steps=0", "optim.schedule=constant", "optim.learning_rate=1e-2",
                              "logging.progress=false", *overrides])


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One RL step's training rows sampled by the tiny policy (numpy; input_ids `[16, 16 + 6]`),
    and the policy's final hidden states `[16, 22, 32]` and LM head `[32, V]` on them."""
    rl = GRPO(tiny_cfg(tmp_path_factory.mktemp("sample")))
    parts, kept, _ = rl.collect(rl.state["params"], step=0)
    batch, _ = rl.build_batch(parts, kept)
    assert batch["loss_mask"].sum() > 0.9 * N * T  # (almost) every token counts: all regions are populated
    model = nnx.merge(rl.trainer.graphdef, rl.state["params"])
    hidden = model.hidden_states(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"]))
    return batch, hidden, model.lm_head_weight()


def shifted_batch(rl, sampled, log_ratio, *, mismatch=None, ref=None):
    """The sampled rows with advantages +0.8 (even rows) / -1.2 (odd rows), old_logp = logp -
    log_ratio, sampler_logp = old_logp - mismatch, ref_logp = logp + ref (all `[N, T]`), where logp
    is the trainer's log-prob under the policy."""
    rows, hidden, head = sampled
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    logp = completion_logprobs(HiddenAndHead(hidden, head), batch, prompt_len=rl.P, temperature=1.0)
    batch["advantages"] = jnp.asarray(np.where(np.arange(N) % 2 == 0, 0.8, -1.2), jnp.float32)
    batch["old_logp"] = logp - jnp.asarray(log_ratio, jnp.float32)
    if mismatch is not None:
        batch["sampler_logp"] = batch["old_logp"] - jnp.asarray(mismatch, jnp.float32)
    if ref is not None:
        batch["ref_logp"] = logp + jnp.asarray(ref, jnp.float32)
    return batch


def token_pattern(values):
    """`[N, T]`: row b holds `values` rotated by b // 2, so both advantage signs (even / odd rows)
    meet every value at every position."""
    return np.stack([np.roll(values, b // 2) for b in range(N)])


def direct_loss(rl, batch, head, *, clip_low, clip_high, clip_ratio_c=None, sequence_ratio=False,
                agg="token-mean", norm_length=None, kl_coef=0.0, tis_cap=None, tis_sequence=False,
                is_mask=None, is_threshold=None):
    """loss(hidden): the GRPO objective written out (dense logits, plain log-softmax, float32);
    and the mask of the tokens it keeps `[N, T]`."""
    mask = np.asarray(batch["loss_mask"], bool)
    adv = jnp.asarray(batch["advantages"])[:, None]
    old = batch["old_logp"]
    weight = 1.0
    if "sampler_logp" in batch and (tis_cap or is_mask):
        d = np.where(mask, np.asarray(old - batch["sampler_logp"], np.float64), 0.0)  # log pi_old / pi_sampler
        seq_d = d.sum(-1, keepdims=True)
        if is_mask == "token":
            mask = mask & (np.abs(d) <= np.log(is_threshold))
        elif is_mask == "sequence":
            mask = mask & (np.abs(seq_d) <= np.log(is_threshold))
        if tis_cap:
            weight = jnp.asarray(np.minimum(np.exp(seq_d if tis_sequence else d), tis_cap), jnp.float32)
    m = jnp.asarray(mask)

    def loss(hidden):
        logits = hidden[:, rl.P - 1:-1] @ head
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["completion"][..., None], -1)[..., 0]
        log_ratio = jnp.where(m, logp - old, 0.0)
        if sequence_ratio:  # GSPO: the length-normalised sequence likelihood ratio
            ratio = jnp.exp(log_ratio.sum(-1, keepdims=True) / jnp.maximum(m.sum(-1, keepdims=True), 1))
        else:
            ratio = jnp.exp(log_ratio)
        objective = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_low, 1 + clip_high) * adv)
        if clip_ratio_c:
            objective = jnp.where(adv < 0, jnp.maximum(objective, clip_ratio_c * adv), objective)
        per_token = -objective * weight
        if kl_coef:
            x = batch["ref_logp"] - logp
            per_token = per_token + kl_coef * jnp.minimum(jnp.exp(x) - x - 1, 10.0)
        per_token = jnp.where(m, jnp.broadcast_to(per_token, m.shape), 0.0)
        rows = m.any(-1)
        if agg == "token-mean":
            return per_token.sum() / m.sum()
        if agg == "seq-mean-token-sum-norm":
            return per_token.sum() / (rows.sum() * norm_length)
        seq = per_token.sum(-1) / jnp.maximum(m.sum(-1), 1)
        return jnp.where(rows, seq, 0.0).sum() / rows.sum()

    return loss, mask


def assert_trainer_matches(rl, sampled, batch, direct):
    """The trainer's loss (`make_grpo_loss` of the GRPO run's `grpo` settings) and its gradient
    equal `direct`'s; returns the metrics the update would report."""
    _, hidden, head = sampled
    loss_fn = make_grpo_loss(rl.g, prompt_len=rl.P)

    def via_trainer(h):
        loss_sum, denominator, terms = loss_fn(HiddenAndHead(h, head), batch)
        return loss_sum / denominator, terms

    l1, g1 = jax.jit(jax.value_and_grad(direct))(hidden)
    (l2, terms), g2 = jax.jit(jax.value_and_grad(via_trainer, has_aux=True))(hidden)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-7)
    return {"loss": float(l2), **{k: float(v) for k, v in terms.metrics().items()}}


@pytest.mark.parametrize("clip_ratio_c,agg", [(3.0, "seq-mean-token-mean"), (0.0, "token-mean")])
def test_clip_bounds_and_dual_clip_bind_in_the_trainer(tmp_path, sampled, clip_ratio_c, agg):
    """Ratios 0.5 0.75 1 1.25 1.6 4 against clip [0.8, 1.28] (DAPO's 0.2 / 0.28) and dual clip 3:
    for A > 0 the loss is capped above 1.28, for A < 0 below 0.8 and (dual clip) above 3."""
    rl = GRPO(tiny_cfg(tmp_path, "grpo.clip_low=0.2", "grpo.clip_high=0.28", f"grpo.clip_ratio_c={clip_ratio_c}",
                       f"grpo.loss_agg_mode={agg}"))
    ratio = token_pattern(RATIOS)
    batch = shifted_batch(rl, sampled, np.log(ratio))
    direct, mask = direct_loss(rl, batch, sampled[2], clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c,
                               agg=agg)
    metrics = assert_trainer_matches(rl, sampled, batch, direct)
    pos = np.broadcast_to((np.arange(N) % 2 == 0)[:, None], mask.shape)
    expected = {"clip_frac_high": pos & (ratio > 1.28), "clip_frac_low": ~pos & (ratio < 0.8)}
    if clip_ratio_c:
        expected["clip_frac_dual"] = ~pos & (ratio > 3.0)
    else:
        assert "clip_frac_dual" not in metrics
    for name, binds in expected.items():
        assert metrics[name] == pytest.approx(binds[mask].mean(), abs=1e-6) and metrics[name] > 0, name
    assert metrics["ratio_mean"] == pytest.approx(ratio[mask].mean(), rel=1e-5)


def test_kl_penalty_to_the_reference_in_the_trainers_loss(tmp_path, sampled):
    """grpo.kl_coef adds kl_coef * k3(pi, pi_ref) per token to the clipped surrogate."""
    rl = GRPO(tiny_cfg(tmp_path, "grpo.kl_coef=0.05"))
    ref = token_pattern(REF)
    batch = shifted_batch(rl, sampled, np.log(token_pattern(RATIOS)), ref=ref)
    direct, mask = direct_loss(rl, batch, sampled[2], clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    metrics = assert_trainer_matches(rl, sampled, batch, direct)
    k3 = np.exp(ref) - ref - 1
    assert metrics["kl"] == pytest.approx(k3[mask].mean(), rel=1e-4)
    assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + 0.05 * metrics["kl"], rel=1e-5)


@pytest.mark.parametrize("settings", [
    {"tis_cap": 1.5},
    {"tis_cap": 1.5, "tis_level": "sequence", "loss_agg_mode": "seq-mean-token-sum-norm", "loss_norm_length": 8},
    {"is_mask": "token", "is_mask_threshold": 1.5},
    {"is_mask": "sequence", "is_mask_threshold": 2.0, "tis_cap": 1.2},
], ids=["tis-token", "tis-sequence", "mask-token", "mask-sequence"])
def test_tis_and_masked_is_against_the_sampler(tmp_path, sampled, settings):
    """Weights w = pi_old / pi_sampler (token, or a sequence's product) on both sides of the cap /
    the mask's [1/c, c]: TIS multiplies the surrogate by min(w, cap), masked IS drops the tokens
    (sequences) outside from the loss and its denominator."""
    rl = GRPO(tiny_cfg(tmp_path, *(f"grpo.{k}={v}" for k, v in settings.items())))
    mismatch = token_pattern(MISMATCH) + MISMATCH_SEQ[np.arange(N) // 2 % 4][:, None]
    batch = shifted_batch(rl, sampled, np.log(token_pattern(RATIOS)), mismatch=mismatch)
    agg = settings.get("loss_agg_mode", "token-mean")
    direct, kept = direct_loss(rl, batch, sampled[2], clip_low=0.2, clip_high=0.28, agg=agg, norm_length=8,
                               tis_cap=settings.get("tis_cap"), tis_sequence=settings.get("tis_level") == "sequence",
                               is_mask=settings.get("is_mask"), is_threshold=settings.get("is_mask_threshold"))
    metrics = assert_trainer_matches(rl, sampled, batch, direct)
    mask = np.asarray(sampled[0]["loss_mask"], bool)
    if "is_mask" in settings:
        rejected = mask & ~kept
        assert 0 < rejected[mask].mean() < 1
        assert metrics["is_masked_frac"] == pytest.approx(rejected[mask].mean(), abs=1e-6)
    if "tis_cap" in settings:
        d = np.where(mask, mismatch, 0.0)
        w = np.exp(d.sum(-1, keepdims=True) if settings.get("tis_level") == "sequence" else d)
        w = np.broadcast_to(w, mask.shape)[kept]
        assert 0 < (w > settings["tis_cap"]).mean() < 1
        assert metrics["tis_clip_frac"] == pytest.approx((w > settings["tis_cap"]).mean(), abs=1e-6)
        assert metrics["tis_weight_mean"] == pytest.approx(np.minimum(w, settings["tis_cap"]).mean(), rel=1e-4)


def test_gspo_sequence_ratio_in_the_trainer(tmp_path, sampled):
    """ratio_level: sequence (GSPO) clips the geometric-mean sequence ratio, not the token ratios
    (which here spread e^-0.6 .. e^0.4 around it)."""
    rl = GRPO(tiny_cfg(tmp_path, "grpo.ratio_level=sequence", "grpo.loss_agg_mode=seq-mean-token-mean"))
    log_ratio = np.log(SEQ_RATIOS[np.arange(N) // 2 % 5])[:, None] + token_pattern(SEQ_NOISE)
    batch = shifted_batch(rl, sampled, log_ratio)
    direct, mask = direct_loss(rl, batch, sampled[2], clip_low=0.2, clip_high=0.28, sequence_ratio=True,
                               agg="seq-mean-token-mean")
    metrics = assert_trainer_matches(rl, sampled, batch, direct)
    seq = np.exp(np.where(mask, log_ratio, 0).sum(-1) / mask.sum(-1))
    pos = np.arange(N) % 2 == 0
    assert ((pos & (seq > 1.28)) | (~pos & (seq < 0.8))).any()  # the sequence clip binds
    assert metrics["ratio_mean"] == pytest.approx(np.broadcast_to(seq[:, None], mask.shape)[mask].mean(), rel=1e-5)


def _record_updates(rl):
    """Wrap `rl.update`: host copies of each update's (batch, params before, optimizer step before)."""
    seen, update = [], rl.update

    def recording(state, batch):
        seen.append(({k: np.asarray(v) for k, v in batch.items()}, jax.device_get(state["params"]),
                     int(state["step"])))
        return update(state, batch)

    rl.update = recording
    return seen


def test_ppo_epochs_mini_batches_and_the_frozen_kl_reference(tmp_path):
    """ppo_epochs=2, mini_batches=2, kl_coef > 0, two RL steps: 4 optimizer steps per RL step, each
    on half the rows (an epoch sees every row once), all with the old log-probs of the policy
    before the step's first update (so the later updates train on ratios != 1); the KL reference
    is the policy at the start of the run, copied once: never updated, and the second step's KL is
    taken against it, not against the policy the step starts from."""
    rl = GRPO(tiny_cfg(tmp_path, "grpo.ppo_epochs=2", "grpo.mini_batches=2", "grpo.kl_coef=0.05"))
    start = jax.device_get(rl.state["params"])
    seen = _record_updates(rl)
    state, first, _ = rl.run_step(rl.state, 0)
    assert [step for _, _, step in seen] == [0, 1, 2, 3] and int(state["step"]) == 4
    after_first = jax.device_get(state["params"])
    state, second, _ = rl.run_step(state, 1)
    assert [step for _, _, step in seen] == list(range(8)) and int(state["step"]) == 8
    counts = [int(c) for path, c in jax.tree_util.tree_leaves_with_path(state["opt_state"])
              if "count" in jax.tree_util.keystr(path)]
    assert counts and set(counts) == {8}  # Adam's bias-correction step count: one per mini-batch
    assert first["skipped_updates"] == second["skipped_updates"] == 0

    for k, (batch, params, _) in enumerate(seen):
        mask = batch["loss_mask"]
        assert batch["input_ids"].shape[0] == N // 2
        pi_old = start if k < 4 else after_first  # the policy before the RL step's first update
        np.testing.assert_allclose(batch["old_logp"][mask], np.asarray(rl._logp(pi_old, batch))[mask], atol=1e-5)
        np.testing.assert_allclose(batch["ref_logp"][mask], np.asarray(rl._logp(start, batch))[mask], atol=1e-5)
        if k % 4:  # the policy moved: pi_old is not the policy this update starts from
            assert np.abs(np.asarray(rl._logp(params, batch)) - batch["old_logp"])[mask].max() > 1e-3, k
        if k >= 4:  # nor is the reference
            assert np.abs(batch["ref_logp"] - batch["old_logp"])[mask].max() > 1e-3, k
    for epoch in range(4):  # each epoch's two mini-batches hold the RL step's rows once each
        rows = sorted(map(bytes, np.concatenate([seen[2 * epoch + i][0]["input_ids"] for i in (0, 1)])))
        assert len(set(rows)) > N // 2 and rows == sorted(map(bytes, np.concatenate(
            [seen[4 * (epoch // 2) + i][0]["input_ids"] for i in (0, 1)])))

    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(jax.device_get(rl.ref_params))):
        np.testing.assert_array_equal(b, a)  # the reference never moved
    now = jax.device_get(state["params"])
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(now)))
    assert second["kl"] > 1e-6  # the last update's KL: against the start, not pi_old
    assert second["loss"] == pytest.approx(second["pg_loss"] + 0.05 * second["kl"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", ["drgrpo", "rloo"])
def test_advantage_mode_reaches_the_batch(tmp_path, mode):
    """grpo.advantage: rewards 0 1 0 1 in a group give +-0.5 (Dr.GRPO, no std) or +-2/3 (RLOO,
    G / (G - 1) x centred), not GRPO's +-0.866."""
    rl = GRPO(tiny_cfg(tmp_path, f"grpo.advantage={mode}"))
    parts, kept, _ = rl.collect(rl.state["params"], step=0)
    batch, _ = rl.build_batch(parts, kept)
    centred = np.tile(np.arange(4) % 2 - 0.5, 4)
    np.testing.assert_allclose(batch["advantages"], centred * (4 / 3 if mode == "rloo" else 1.0), rtol=1e-6)

"""Bradley–Terry reward model: pairwise loss against hand-computed values, the scalar head under
left / right padding, LM -> RM conversion, orbax and HF round trips (BT and POLAR), evaluation
(accuracy, per subset) on real HH-RLHF pairs, bad rows, and (slow) end-to-end training runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.eval.reward_model import bt_pair_accuracy, pairwise_accuracy
from jaxrl_rm.main import main
from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.resize import add_tokens_and_resize, reward_model_from_lm
from jaxrl_rm.models.reward import RewardModel
from jaxrl_rm.models.transformer import Transformer
from jaxrl_rm.rewards.scalar_rm import POLAR_SPECIAL_TOKENS, BTInputBuilder, BTScorer, PolarScorer, pad_sequences
from jaxrl_rm.train.reward_model import pair_rows, pairwise_rm_loss, split_by_prompt

QUIET = ["logging.progress=false", "logging.tensorboard=false"]
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", *QUIET]


def nll(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log(1.0 + math.exp(-x))


class FixedRewards:
    """A stand-in model returning preset rewards for the `[2B]` stacked batch (chosen rows first)."""

    def __init__(self, rewards):
        self.rewards = jnp.asarray(rewards, jnp.float32)

    def __call__(self, ids, mask, *, score_index):
        assert ids.shape[0] == self.rewards.shape[0] and score_index.shape == (ids.shape[0],)
        return self.rewards


def _batch(n):
    seqs = [(np.arange(3, dtype=np.int32), 2)] * n
    return {k: jnp.asarray(v) for k, v in pair_rows(seqs, seqs, length=4, pad_id=0).items()}


def test_pairwise_loss_matches_hand_computed_values():
    rc, rr = [2.0, 0.5, 7.0], [1.0, 1.5, -3.0]
    batch = _batch(3)
    batch["valid"] = jnp.asarray([True, True, False])  # the third pair is padding
    model = FixedRewards(rc + rr)

    loss_sum, denom, sums = pairwise_rm_loss()(model, batch)
    assert float(denom) == 2.0
    assert float(loss_sum) == pytest.approx(nll(1.0) + nll(-1.0), rel=1e-6)  # 0.31326 + 1.31326
    assert float(sums["accuracy"]) == 1.0 and float(sums["margin_mean"]) == pytest.approx(0.0)

    loss_sum, denom, sums = pairwise_rm_loss(margin=0.5, center_coef=0.1)(model, batch)
    expected = nll(1.0 - 0.5) + nll(-1.0 - 0.5) + 0.1 * ((2.0 + 1.0) ** 2 + (0.5 + 1.5) ** 2)
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)  # 0.47408 + 1.70141 + 1.3
    assert float(sums["bt_loss"]) == pytest.approx(nll(0.5) + nll(-1.5), rel=1e-6)
    assert float(sums["accuracy"]) == 1.0  # accuracy is on r_c > r_r, not on the margin


def test_pairwise_accuracy_and_subsets():
    m = pairwise_accuracy([1.0, 2.0, 3.0, 0.0], [0.0, 3.0, 3.0, -1.0], subsets=["a", "a", "b", None], prefix="eval_")
    assert m["eval_accuracy"] == 0.5 and m["eval_tie_rate"] == 0.25 and m["eval_count"] == 4
    assert m["eval_accuracy/a"] == 0.5 and m["eval_accuracy/b"] == 0.0 and m["eval_count/a"] == 2
    assert m["eval_loss"] == pytest.approx(np.mean([nll(1), nll(-1), nll(0), nll(1)]))
    assert pairwise_accuracy([], [])["accuracy"] == 0.0


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def bt_rm(tok):
    rm = RewardModel(ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64), rngs=nnx.Rngs(3))
    rm.score = nnx.Param(jax.random.normal(jax.random.key(1), rm.score.shape))  # a non-trivial head
    return rm


def test_bt_builder_truncation_and_head_position(tok, bt_rm):
    b = BTInputBuilder(tok, 16, chat_template=False)
    eos = tok.eos_token_id
    ids, idx = b.build("abcdefghij", "xyz")
    assert tok.decode(ids) == "abcdefghijxyz<|end|>" and len(ids) == 14 and idx == 13 and ids[idx] == eos  # fits
    ids, idx = b.build("abcdefghij", "0123456789")
    assert tok.decode(ids) == "fghij0123456789<|end|>" and len(ids) == 16 and idx == 15  # prompt tail
    ids, idx = b.build("abc", "0123456789abcdefghij")
    assert tok.decode(ids) == "c0123456789abcde" and idx == 15  # response head, eos cut off

    # Scalar head: the last real token, whatever the padding side (and the same as unpadded).
    seqs = BTInputBuilder(tok, 32).build_many(["hi there", "q"], ["yes", "a longer answer"])
    forward = jax.jit(lambda i, m, j: bt_rm(i, m, score_index=j))
    alone = [float(forward(x[None], np.ones((1, len(x)), bool), np.array([j]))[0]) for x, j in seqs]
    for side in ("left", "right"):
        batch = pad_sequences(seqs, length=32, pad_id=tok.pad_token_id, padding_side=side)
        assert (batch["input_ids"][np.arange(2), batch["score_index"]] == eos).all()
        r = forward(batch["input_ids"], batch["attention_mask"], batch["score_index"])
        np.testing.assert_allclose(np.asarray(r), alone, atol=1e-5)
        np.testing.assert_allclose(np.asarray(jax.jit(bt_rm)(batch["input_ids"], batch["attention_mask"])), alone,
                                   atol=1e-5)  # default: last non-pad token


def test_reward_model_from_lm_drops_lm_head_and_keeps_backbone(tok):
    lm = Transformer(ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, tie_word_embeddings=False))
    ids = jnp.asarray([[5, 6, 7, 8]])
    hidden = np.asarray(jax.jit(lambda x: lm.hidden_states(x))(ids))
    t = build_char_tokenizer()
    old_logits = np.asarray(jax.jit(lm)(ids))
    add_tokens_and_resize(lm, t, POLAR_SPECIAL_TOKENS)
    assert lm.lm_head.kernel.shape == (32, len(t))
    new_logits = np.asarray(jax.jit(lm)(ids))
    np.testing.assert_allclose(new_logits[..., : old_logits.shape[-1]], old_logits, atol=1e-6)
    w = np.asarray(lm.lm_head.kernel[...])
    np.testing.assert_allclose(w[:, -1], w[:, : old_logits.shape[-1]].mean(1), rtol=1e-5)  # new column = mean
    rm = reward_model_from_lm(lm)
    assert rm.backbone.lm_head is None and "lm_head" not in nnx.to_pure_dict(nnx.state(rm, nnx.Param))["backbone"]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: rm.backbone.hidden_states(x))(ids)), hidden, atol=1e-6)


def test_split_by_prompt_keeps_prompts_together():
    from jaxrl_rm.data.records import PreferencePair

    recs = [PreferencePair(prompt=f"p{i % 50}", chosen="a", rejected="b") for i in range(500)]
    train, held = split_by_prompt(recs, 0.2, seed=0)
    assert len(train) + len(held) == 500 and 0 < len(held) < 250
    assert not {r.prompt for r in train} & {r.prompt for r in held}
    assert split_by_prompt(recs, 0.2, seed=0) == (train, held)


@pytest.mark.parametrize("kind", ["bt", "polar"])
def test_round_trip_orbax_and_hf_preserves_scores(kind, tmp_path):
    from jaxrl_rm.models.hf import load_model, save_model
    from jaxrl_rm.data.tokenizer import load_tokenizer
    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.train.checkpoint import Checkpointer
    from jaxrl_rm.train.state import Trainer, abstract_like, make_optimizer
    from jaxrl_rm.config import OptimConfig

    t = build_char_tokenizer()
    lm = Transformer(ModelConfig.for_family("qwen2", vocab_size=len(t), hidden_size=32, intermediate_size=64,
                                            tie_word_embeddings=False), rngs=nnx.Rngs(5))
    if kind == "polar":
        add_tokens_and_resize(lm, t, POLAR_SPECIAL_TOKENS)
    rm = reward_model_from_lm(lm, seed=2)
    rm.score = nnx.Param(jax.random.normal(jax.random.key(4), rm.score.shape))
    args = (["what is the sea", "hi"], ["the sea is wide", "hello"], ["SEA", "hey"])
    make = (lambda m, tk: PolarScorer(m, tk, 64, batch_size=2)) if kind == "polar" else \
        (lambda m, tk: BTScorer(m, tk, 64, batch_size=2))
    score = (lambda s: s.score(*args)) if kind == "polar" else (lambda s: s.score(args[0], args[2]))
    expected = score(make(rm, t))

    # orbax: the train state (params incl. the head) saved and restored onto the same shardings.
    trainer = Trainer(graphdef=nnx.split(rm)[0], optimizer=make_optimizer(OptimConfig(), 10), mesh=make_mesh())
    state = trainer.init_state(rm, 0)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=1, async_save=False)
    ckpt.save(1, state, {"note": kind})
    ckpt.wait()
    zero = jax.tree.map(jnp.zeros_like, state)
    restored, extra, step = ckpt.restore(abstract_like(zero))
    ckpt.close()
    assert step == 1 and extra == {"note": kind}
    np.testing.assert_array_equal(score(make(trainer.model(restored), t)), expected)

    # HF: *ForSequenceClassification with score.weight, tokenizer (with the POLAR tokens) beside it.
    save_model(trainer.model(restored), tmp_path / "hf", tokenizer=t)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["vocab_size"] == len(t)
    again, t2 = load_model(tmp_path / "hf"), load_tokenizer(tmp_path / "hf")
    assert isinstance(again, RewardModel) and len(t2) == len(t)
    text = t.apply_chat_template([{"role": "user", "content": "what is the sea"}], tokenize=False)
    assert t2.encode(text, add_special_tokens=False) == t.encode(text, add_special_tokens=False)  # spaces kept
    np.testing.assert_array_equal(np.asarray(again.score[...]), np.asarray(rm.score[...]))
    np.testing.assert_array_equal(score(make(again, t2)), expected)
    cls = PolarScorer if kind == "polar" else BTScorer
    np.testing.assert_array_equal(score(cls.from_pretrained(tmp_path / "hf", max_length=64, batch_size=2)), expected)


def test_bt_accuracy_on_real_hh_rlhf_pairs(shared_data, tok, bt_rm):
    """Every pair of the real HH-RLHF harmless test split parses into a BT pair (the 4 empty-answer
    rows are skipped and counted), and BT accuracy is computed per subset on them."""
    from jaxrl_rm.data.loaders import load_hh_rlhf

    pairs, stats = load_hh_rlhf(shared_data / "hh_rlhf" / "harmless_base_test.jsonl.gz", on_bad_row="skip",
                                subset="harmless_base")
    assert stats.rows_read == 2312 and stats.rows_skipped == 4 and len(pairs) == 2308
    sample = pairs[::24][:96]
    m = bt_pair_accuracy(BTScorer(bt_rm, tok, 192, batch_size=48), sample, prefix="eval_")
    assert m["eval_count"] == 96 and m["eval_count/harmless_base"] == 96
    # deterministic: the seeded random RM ranks 43 of the 96 pairs right, none tied (min |margin| 1.4e-3)
    assert m["eval_accuracy"] == m["eval_accuracy/harmless_base"] == 43 / 96 and m["eval_tie_rate"] == 0


def test_bt_pipeline_run_dir_and_bad_rows(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = [json.dumps({"prompt": f"question {i % 20}", "chosen": "yes" * (1 + i % 3), "rejected": "no",
                        "subset": "s" + str(i % 2)}) for i in range(40)]
    lines = good[:5] + ['{"prompt": "q", "chosen": "", "rejected": "x"}'] + good[5:]
    data.write_text("\n".join(lines) + "\n")
    base = ["task=rm_bt", f"data.train={data}", "data.max_length=24", "train.steps=3", "train.batch_size=8",
            "rm.eval_fraction=0.3", *TINY]
    with pytest.raises(ValueError) as e:
        main(base + [f"run_dir={tmp_path / 'r1'}"])
    assert f"{data}:6" in str(e.value) and "chosen" in str(e.value)
    run_dir = tmp_path / "r2"
    assert main(base + [f"run_dir={run_dir}", "data.on_bad_row=skip"]) == 0
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["data/rows_skipped"] == 1 and s["train_pairs"] + s["eval_pairs"] == 40
    for k in ("eval_accuracy_before", "eval_accuracy_after", "eval_accuracy_gain", "eval_accuracy/s0_after"):
        assert k in s, k
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "hf/config.json", "hf/model.safetensors"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in r and "loss" in r for r in rows)


# --- slow end to end ----------------------------------------------------------------------------
def _cli(*args, timeout=1800):
    out = subprocess.run([sys.executable, "-m", "jaxrl_rm.main", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bt_tiny_config_learns(tmp_path):
    s = _cli("--config", "configs/rm_bt_tiny.yaml", f"run_dir={tmp_path}", *QUIET)
    assert s["eval_accuracy_after"] >= 0.9 and s["eval_accuracy_gain"] > 0.2, s
    assert s["eval_accuracy_before"] < 0.7
    assert s["eval_accuracy/in_capitals_after"] >= 0.9 and s["eval_accuracy/in_small_letters_after"] >= 0.9


@pytest.mark.slow
def test_bt_on_real_hh_rlhf(tmp_path, shared_data):
    s = _cli("--config", "configs/rm_bt_hh_tiny.yaml", f"run_dir={tmp_path}",
             f"data.train=hh_rlhf:{shared_data / 'hh_rlhf' / 'harmless_base_test.jsonl.gz'}", "rm.eval_size=0", *QUIET)
    assert s["data/rows_skipped"] == 4 and s["train_pairs"] + s["eval_pairs"] == 2308
    assert s["eval_pairs"] == 242 and s["train_pairs"] == 2066  # 10% of the prompts held out (seed 0)
    # measured 0.504 -> 0.587 (60 steps, seed 0; seeds 1, 2: 0.460 -> 0.498, 0.510 -> 0.612): a tiny
    # character-level RM learns a little of what carries to held-out HH-RLHF pairs
    assert s["eval_accuracy_after"] > s["eval_accuracy_before"], s
    assert s["eval_accuracy/harmless_base_test_after"] == s["eval_accuracy_after"]


@pytest.mark.slow
def test_rm_pipeline_on_a_sharded_mesh(tmp_path):
    """POLAR fine-tuning on 8 fake CPU devices (data x fsdp x tensor = 2 x 2 x 2): trains, evaluates
    with the sharded params, and the exported RM scores like the mesh-less scorer."""
    from multidevice import run_with_devices

    out = run_with_devices(f"""
        import json, numpy as np, jax
        from jaxrl_rm.main import main
        from jaxrl_rm.parallel.mesh import make_mesh
        from jaxrl_rm.rewards.scalar_rm import PolarScorer
        assert jax.device_count() == 8
        args = ["task=polar_finetune", "run_dir={tmp_path}", "data.train=synthetic:style_triples",
                "data.synthetic_size=64", "data.max_length=96", "rm.eval_size=16", "train.steps=3",
                "train.batch_size=8", "train.micro_batches=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                "logging.progress=false", "logging.tensorboard=false"]
        assert main(args) == 0
        s = json.load(open("{tmp_path}/summary.json"))
        assert np.isfinite(s["eval_loss_after"]) and s["eval_count"] == 16
        plain = PolarScorer.from_pretrained("{tmp_path}/hf", max_length=96, batch_size=8)
        sharded = PolarScorer.from_pretrained("{tmp_path}/hf", max_length=96, batch_size=8,
                                              mesh=make_mesh(data=4, fsdp=2, tensor=1))
        args = (["what is the sea"] * 5, ["sea sea"] * 5, ["a", "b", "c", "sea", "SEA"])
        np.testing.assert_allclose(sharded.score(*args), plain.score(*args), atol=1e-5)
        print("OK")
    """)
    assert "OK" in out


def test_source_errors_name_the_key():
    from jaxrl_rm.config import ConfigError, load_config
    from jaxrl_rm.train.reward_model import STAGES, load_rm_records

    cfg = load_config(None, ["task=polar_pretrain"])
    with pytest.raises(ConfigError, match=r"data.train: synthetic:style_pairs makes PreferencePair records"):
        load_rm_records("synthetic:style_pairs", STAGES["polar_pretrain"], cfg, split="train")
    with pytest.raises(ConfigError, match=r"data.train: unknown synthetic reward-model task 'nope'"):
        load_rm_records("synthetic:nope", STAGES["rm_bt"], cfg, split="train")
    with pytest.raises(ConfigError, match=r"hh_rlhf sources give preference pairs"):
        load_rm_records("hh_rlhf:x.jsonl", STAGES["polar_finetune"], cfg, split="train")


def test_bt_rm_reward_loads_in_the_runs_dtypes_and_layout(tmp_path, tok):
    """`type: bt_rm` in a GRPO run loads the RM like the policy (`models.factory.load_frozen`): a
    bfloat16, scanned run gets a bfloat16, scanned RM (what `--plan` assumes), whose scores stay
    within bf16 rounding of the float32 RM's."""
    import types

    from jaxrl_rm.config import ModelSpec, RewardSpec
    from jaxrl_rm.models.hf import save_model
    from jaxrl_rm.rewards.sources import build_source

    rm = RewardModel(ModelConfig.for_family("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64),
                     rngs=nnx.Rngs(3))
    rm.score = nnx.Param(jax.random.normal(jax.random.key(1), rm.score.shape))
    save_model(rm, tmp_path / "rm", tokenizer=tok)
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(model=ModelSpec(dtype="bfloat16", param_dtype="bfloat16",
                                                                          scan_layers=True)))
    spec = RewardSpec(type="bt_rm", path=str(tmp_path / "rm"), options={"max_length": 64})
    src = build_source(spec, {"grpo": run})
    plain = build_source(spec, {})
    leaves = jax.tree.leaves(src.scorer.params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert nnx.merge(src.scorer.graphdef, src.scorer.params).backbone.scan_layers
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(plain.scorer.params))
    prompts, responses = ["reverse: abc", "reverse: hello"], ["cba", "olleh there"]
    a, b = src.scorer.score(prompts, responses), plain.scorer.score(prompts, responses)
    np.testing.assert_allclose(a, b, atol=0.05 * (1 + np.abs(b).max()))

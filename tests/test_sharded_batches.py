"""GRPO and J1 on 8 fake CPU devices (data=2 x fsdp=2 x tensor=2): every batch the trainer places,
every (mini-)batch its update receives and every batch of prompt rows the sampler receives is
split over ("data", "fsdp") - rows / 4 on each device - and two steps give the 1-device run's
samples, rewards and losses.

What they receive is captured in the subprocess by wrapping `grpo.shard_batch`, the step that
`grpo.build_train_step` returns and `sampler._generate_jit` (a replicated batch gives the same
numbers, so equality alone would not show the split)."""

import json

import pytest

from multidevice import run_with_devices

MESH_8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
SPLIT = 4  # data * fsdp

CAPTURE = """
import json
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxrl_rm.config import load_config
from jaxrl_rm.parallel.mesh import make_mesh
from jaxrl_rm.sampling import sampler as sampler_mod
from jaxrl_rm.train import grpo as grpo_mod

MESH_OVERRIDES, RUN = __MESH__, __RUN__
sizes = {k.split("=")[0].split(".")[1]: int(k.split("=")[1]) for k in MESH_OVERRIDES if k.startswith("mesh.")}
MESH = make_mesh(sizes.get("data", -1), sizes.get("fsdp", 1), sizes.get("tensor", 1))
SEEN = {"placed": [], "train": [], "sample": []}
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "logging.progress=false", "logging.tensorboard=false", "data.synthetic_size=64"]


def placement(x, axis):
    # rows along `axis`, whether the array is placed exactly as (data, fsdp)-sharded rows, and the
    # rows each device holds
    spec = [None] * x.ndim
    spec[axis] = ("data", "fsdp")
    return {"rows": int(x.shape[axis]),
            "split": bool(x.sharding.is_equivalent_to(NamedSharding(MESH, P(*spec)), x.ndim)),
            "per_device": sorted({int(s.data.shape[axis]) for s in x.addressable_shards})}


_shard = grpo_mod.shard_batch
def shard_batch(batch, mesh):
    out = _shard(batch, mesh)
    SEEN["placed"].append({k: placement(v, 0) for k, v in out.items()})
    return out
grpo_mod.shard_batch = shard_batch

_build = grpo_mod.build_train_step
def build_train_step(*args, **kwargs):
    step = _build(*args, **kwargs)
    def update(state, batch):
        SEEN["train"].append({k: placement(v, 0) for k, v in batch.items()})
        return step(state, batch)
    return update
grpo_mod.build_train_step = build_train_step

_generate = sampler_mod._generate_jit
def generate_core(graphdef, state, head, prompt_ids, prompt_lens, live, uniforms, *rest, **kwargs):
    SEEN["sample"].append({"prompt_ids": placement(prompt_ids, 0), "prompt_lens": placement(prompt_lens, 0),
                           "live": placement(live, 0), "uniforms": placement(uniforms, 1)})
    return _generate(graphdef, state, head, prompt_ids, prompt_lens, live, uniforms, *rest, **kwargs)
sampler_mod._generate_jit = generate_core
"""

GRPO_RUN = CAPTURE + """
from jaxrl_rm.rewards import sources

class Spread:
    # a rule reward that varies within groups: distinct characters of the answer, mod 3
    name = "spread"
    def __call__(self, rollouts):
        return np.asarray([[len(set(c)) % 3 for c in cs] for cs in rollouts.completions], np.float32), {}

sources.register("test_spread", lambda spec, ctx: Spread())
cfg = load_config(None, ["task=grpo", "run_dir=" + RUN, *TINY, *MESH_OVERRIDES,
                         "grpo.prompts_per_step=4", "grpo.num_samples=4", "grpo.max_new_tokens=8",
                         "grpo.max_prompt_length=16", "grpo.eval_size=4", "grpo.kl_coef=0.05",
                         "grpo.mini_batches=2", "optim.learning_rate=1e-2", "optim.warmup_steps=0",
                         "grpo.tasks=[{name: reverse, data: 'synthetic:reverse', rewards: [{type: test_spread}]}]"])
rl = grpo_mod.GRPO(cfg)
state, steps = rl.state, []
for step in range(2):
    state, m, _ = rl.run_step(state, step)
    steps.append({k: m[k] for k in ("loss", "grad_norm", "kl", "reward_mean", "reward_std", "sample_hash")})
print("RESULT " + json.dumps({"steps": steps, "seen": SEEN}))
"""

J1_RUN = CAPTURE + """
from jaxrl_rm.train.judge import run_judge_j1

cfg = load_config(None, ["task=judge_j1", "run_dir=" + RUN, *TINY, *MESH_OVERRIDES,
                         "judge.train_sampler=corrupt", "judge.eval_sampler=corrupt", "judge.num_train_prompts=32",
                         "judge.num_eval_prompts=8", "judge.warmup_steps=0", "judge.eval_size=4",
                         "train.steps=2", "train.log_every=1", "checkpoint.every=0",
                         "grpo.prompts_per_step=4", "grpo.num_samples=4", "grpo.max_prompt_length=48",
                         "grpo.max_new_tokens=8", "grpo.entropy_coef=0.05", "grpo.kl_coef=0.05"])
summary = run_judge_j1(cfg)
rows = [json.loads(line) for line in open(RUN + "/metrics.jsonl")]
steps = [{k: r[k] for k in ("loss", "grad_norm", "entropy", "reward_mean", "reward_std", "sample_hash")}
         for r in rows if "sample_hash" in r]
print("RESULT " + json.dumps({"steps": steps, "seen": SEEN,
                              "accuracy": [summary["judge_accuracy_before"], summary["judge_accuracy_after"]]}))
"""


def run(code: str, n: int, mesh: list[str], run_dir) -> dict:
    out = run_with_devices(code.replace("__MESH__", repr(mesh)).replace("__RUN__", repr(str(run_dir))), n=n)
    return json.loads(out.split("RESULT ", 1)[1])


def assert_split(seen: dict, rows: int, n_updates: int, update_rows: int) -> None:
    """Every captured batch array is (data, fsdp)-sharded with rows / 4 rows on each device: each
    step's batch as placed (`rows`), each update's (mini-)batch (`update_rows`), each sampler call."""
    assert len(seen["placed"]) == 2 and len(seen["train"]) == n_updates
    for batches, n in ((seen["placed"], rows), (seen["train"], update_rows)):
        for batch in batches:
            assert {"input_ids", "completion", "loss_mask", "advantages"} <= set(batch)
            for name, p in batch.items():
                assert p == {"rows": n, "split": True, "per_device": [n // SPLIT]}, (name, p)
    assert all({"old_logp", "ref_logp"} <= set(batch) for batch in seen["train"])
    assert seen["sample"]
    for call in seen["sample"]:
        for name, p in call.items():
            assert p["split"] and p["per_device"] == [p["rows"] // SPLIT], (name, p)


def assert_same_steps(single: list[dict], sharded: list[dict]) -> None:
    assert len(single) == len(sharded) == 2
    for one, eight in zip(single, sharded):
        assert eight["sample_hash"] == one["sample_hash"]
        for key, value in one.items():
            if key != "sample_hash":
                assert eight[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_grpo_batches_are_split_and_steps_match_one_device(tmp_path):
    """GRPO with KL (reference log-probs) and two mini-batches: 16 rows per step, 8 per update."""
    single = run(GRPO_RUN, 1, [], tmp_path / "one")
    sharded = run(GRPO_RUN, 8, MESH_8, tmp_path / "eight")
    assert_split(sharded["seen"], rows=16, n_updates=4, update_rows=8)
    assert all(s["reward_std"] > 0 and s["kl"] >= 0 for s in single["steps"])  # the updates do something
    assert_same_steps(single["steps"], sharded["steps"])


@pytest.mark.slow
def test_j1_batches_are_split_and_steps_match_one_device(tmp_path):
    """The J1 judge loop (run_judge_j1: rule-sampled judgments, no warm-up, 2 RL steps with an
    entropy bonus and KL, so that the random judge's all-zero rewards still move it): the judge's
    rollouts, evaluation and updates are split; samples, rewards, losses and judge accuracy match."""
    single = run(J1_RUN, 1, [], tmp_path / "one")
    sharded = run(J1_RUN, 8, MESH_8, tmp_path / "eight")
    assert_split(sharded["seen"], rows=16, n_updates=2, update_rows=16)
    assert_same_steps(single["steps"], sharded["steps"])
    assert sharded["accuracy"] == single["accuracy"]


@pytest.mark.slow
def test_grpo_with_the_slot_engine_on_the_mesh_matches_one_device(tmp_path):
    """`grpo.rollout_engine=slots` on the 8-device mesh (a slot group per data shard, weights
    tensor-sharded): the same samples, rewards and updates as the static sampler on one device."""
    single = run(GRPO_RUN, 1, [], tmp_path / "one")
    sharded = run(GRPO_RUN, 8, [*MESH_8, "grpo.rollout_engine=slots"], tmp_path / "eight")
    assert not sharded["seen"]["sample"]  # the static sampler never ran
    assert_same_steps(single["steps"], sharded["steps"])

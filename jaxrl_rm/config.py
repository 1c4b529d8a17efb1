"""The config schema: one dataclass per section, defaults that run on a laptop CPU.

`python -m jaxrl_rm.main --config configs/x.yaml a.b=c` builds a `Config` from YAML + overrides
(`jaxrl_rm.configlib`); `python -m jaxrl_rm.main --help` prints every key with its default.
Field docs are the `#:` comments above each field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from jaxrl_rm.configlib import ConfigError, apply_override, check, from_dict, read_yaml, to_dict

__all__ = ["Config", "ConfigError", "load_config", "to_dict"]


#: The reasoning a judge warm-up (and an online judge refresh) writes before the teacher's verdict.
WarmupThink = Literal["compare", "aligned", "path", "reference", "response", "fixed"]
#: Judge teachers whose rule-made answers (warm-up `warmup_corrupt`, near misses) can be labelled
#: by rule (`synthetic.rule_label`: exact match, or the path check): a math-verify teacher's cannot
#: (an edited math answer may still be right).
RULE_LABELLED_TEACHERS = ("exact_match", "path_check")


@dataclasses.dataclass
class ModelSpec:
    #: Local HF directory (config.json + safetensors + tokenizer). Empty: random init from below.
    path: str = ""
    #: Tokenizer directory; empty = `path`, or the built-in character tokenizer when `path` is empty.
    tokenizer: str = ""
    #: Random-init architecture (used when `path` is empty): llama | qwen2 | qwen3.
    model_type: Literal["llama", "qwen2", "qwen3"] = "qwen2"
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = True
    #: Compute dtype of activations (float32 | bfloat16); log-probs and losses stay float32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    #: Storage dtype of weights.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    #: Stack the layers' weights ([L, ...]) and run them as one `lax.scan`: compile time and
    #: program size stop growing with depth (set it for real models: configs/recipes do).
    #: false = one module per layer, unrolled: the default, because on a CPU the scanned stack
    #: decodes ~1.45x slower (it slices each layer's weights and cache out of the stacks every
    #: step) and the tiny runs' RL outcomes, which hang on their chaotic SFT warm-up, were
    #: measured unrolled (README, "Layer layout and remat"). Checkpoints resume within one
    #: layout; an HF export loads into either.
    scan_layers: bool = False
    #: Per-layer rematerialisation (jax.checkpoint) in the backward pass: none (save every
    #: activation) | full (save only each layer's input, recompute the layer) | dots_saveable
    #: (save matmul outputs, attention scores included) | dots_with_no_batch_dims_saveable (save
    #: only the weight matmuls). Same values and gradients; trades FLOPs for memory.
    remat: Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "none"

    def validate(self, key="model"):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads"):
            check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        check(self.num_attention_heads % self.num_key_value_heads == 0, f"{key}.num_key_value_heads",
              "must divide num_attention_heads")
        check(self.hidden_size % self.num_attention_heads == 0, f"{key}.hidden_size",
              "must be a multiple of num_attention_heads")


@dataclasses.dataclass
class MeshConfig:
    #: Devices on the data-parallel axis; -1 = all devices not used by the other axes.
    data: int = -1
    #: Devices on the FSDP axis (weights and optimizer state sharded, batch too).
    fsdp: int = 1
    #: Devices on the tensor-parallel axis (heads, MLP and vocab sharded).
    tensor: int = 1

    def validate(self, key="mesh"):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            check(v == -1 or v > 0, f"{key}.{name}", f"must be -1 or > 0, got {v}")


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    #: constant | cosine | linear (decay to `end_lr_fraction * learning_rate`), after warmup.
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 10
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    #: Global gradient-norm clip; 0 disables.
    grad_clip: float = 1.0

    def validate(self, key="optim"):
        check(self.learning_rate > 0, f"{key}.learning_rate", "must be > 0")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(0 <= self.end_lr_fraction <= 1, f"{key}.end_lr_fraction", "must be in [0, 1]")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{key}.b1", "b1 and b2 must be in [0, 1)")
        check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 200
    #: Global batch size (sequences per optimizer step, all devices and hosts together).
    batch_size: int = 32
    #: Gradient accumulation: the batch is split into this many micro-batches (exact: sums, then one divide).
    micro_batches: int = 1
    #: Log metrics every N steps (loss, grad norm, reward statistics).
    log_every: int = 1
    #: Stop with an error after this many consecutive updates with non-finite loss/gradients
    #: (each is skipped: weights and optimizer state stay as they were).
    max_consecutive_skips: int = 5
    #: Evaluate every N steps (0: only before and after training).
    eval_every: int = 0
    #: Batches per evaluation.
    eval_batches: int = 4

    def validate(self, key="train"):
        check(self.steps >= 0, f"{key}.steps", "must be >= 0")
        check(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        check(self.micro_batches > 0 and self.batch_size % self.micro_batches == 0, f"{key}.micro_batches",
              f"must be > 0 and divide train.batch_size={self.batch_size}")
        check(self.log_every > 0, f"{key}.log_every", "must be > 0")
        check(self.max_consecutive_skips >= 1, f"{key}.max_consecutive_skips", "must be >= 1")
        check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")


@dataclasses.dataclass
class DataConfig:
    #: Training data: a JSONL(.gz) path, or `synthetic:<task>` (see jaxrl_rm.data.synthetic).
    train: str = "synthetic:arithmetic"
    #: Held-out data (same forms); empty = a held-out synthetic split, or none for files.
    eval: str = ""
    #: Number of records drawn from a synthetic source.
    synthetic_size: int = 4000
    #: Record field names in JSONL files.
    prompt_field: str = "prompt"
    response_field: str = "response"
    #: What a malformed row does: error (names file, line, field) | skip (counted in metrics).
    on_bad_row: Literal["error", "skip"] = "error"
    #: Tokens per sequence (prompt + response); longer examples keep the prompt's tail.
    max_length: int = 64
    #: Pack several examples per row (segment-masked attention) instead of padding each one.
    packing: bool = False
    #: Render prompts through the tokenizer's chat template when it has one.
    chat_template: bool = True
    shuffle: bool = True

    def validate(self, key="data"):
        check(bool(self.train), f"{key}.train", "must name a file or a synthetic:<task> source")
        check(self.max_length >= 8, f"{key}.max_length", "must be >= 8")
        check(self.synthetic_size > 0, f"{key}.synthetic_size", "must be > 0")


@dataclasses.dataclass
class CheckpointConfig:
    #: Save every N steps (0: only at the end and on preemption).
    every: int = 100
    #: Keep the newest N checkpoints.
    keep: int = 2
    #: Write checkpoints in the background (waited for before exit).
    async_save: bool = True

    def validate(self, key="checkpoint"):
        check(self.every >= 0, f"{key}.every", "must be >= 0")
        check(self.keep >= 1, f"{key}.keep", "must be >= 1")


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    #: Show a progress bar (steps, loss, tokens/s, ETA).
    progress: bool = True
    #: Also log to this Weights & Biases project (needs `pip install wandb`; empty = off, no network).
    wandb_project: str = ""
    #: W&B entity (team or user); empty = your default.
    wandb_entity: str = ""


@dataclasses.dataclass
class DistributedConfig:
    #: Call jax.distributed.initialize: auto (when the environment names a coordinator) | true | false.
    initialize: Literal["auto", "true", "false"] = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass
class RewardSpec:
    """One reward source of a task; the task's reward is the weighted sum of its sources."""

    #: verifier | exact_match | ranking | hidden_quality | bt_rm | polar_rm | judge | self_judge |
    #: score_match (J1 judge training) | ensemble (members reduced by mean / min; see
    #: jaxrl_rm.rewards.sources and jaxrl_rm.rewards.judge_source).
    type: str = "verifier"
    weight: float = 1.0
    #: Model directory for model-backed sources (bt_rm, polar_rm, judge).
    path: str = ""
    #: Source-specific keyword options (e.g. judge mode, template, answer formats).
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskSpec:
    """A prompt source of the RL mixture, with its own prompt format and reward."""

    name: str = "math"
    #: verifiable ({prompt, answer}) | open ({prompt, reference?}) | ranking ({prompt, responses, gold_scores})
    #: | judgment ({prompt, response, label}: the policy judges; J1).
    kind: Literal["verifiable", "open", "ranking", "judgment"] = "verifiable"
    #: JSONL(.gz) path or synthetic:<task>; verifiable tasks also take `gsm8k:<path>` (GSM8K rows, gold
    #: after `####`) and `math:<path>` (MATH rows {problem, solution}: gold = the last \boxed{}, or `answer`).
    data: str = "synthetic:arithmetic"
    #: Held-out prompts for evaluation (same forms); empty: a held-out synthetic split, or none.
    eval_data: str = ""
    #: Share of each batch (normalised over the active tasks).
    ratio: float = 1.0
    #: Curriculum: the task joins the mixture at this step.
    start_step: int = 0
    rewards: list[RewardSpec] = dataclasses.field(default_factory=lambda: [RewardSpec()])
    #: Options of the task's prompt format (ranking/judgment tasks: `template`, `template_options`,
    #: which render the prompt and parse the answer; ranking: `shuffle_responses`, default true: a
    #: fresh seeded order of the responses at every draw), and evaluation: `eval_verifier` (verifier |
    #: exact_match | path_check) for held-out accuracy; `win_rate_judge` ({type: judge, path: <HF judge dir>,
    #: options: {...}}) for `win_rate/<task>`: the policy's greedy answer vs the item's reference,
    #: judged pairwise in both orders with greedy verdicts (ties count 1/2).
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GRPOConfig:
    #: G: completions sampled per prompt.
    num_samples: int = 8
    #: B: prompts per RL step (the batch is B x G completions).
    prompts_per_step: int = 16
    #: Prompt token budget (longer prompts keep their tail).
    max_prompt_length: int = 32
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    #: Rollout sampler (jaxrl_rm.rollout.collect): static (one batch decoded until its last row stops;
    #: rows sharded over the mesh) | slots (continuous batching over `rollout_slots` sample slots,
    #: one copy of each prompt's K/V for its G samples; one device). Same samples for a seed.
    rollout_engine: Literal["static", "slots"] = "static"
    #: Rollout KV cache (either engine): compute (the model's compute dtype: bf16 under bf16) | int8
    #: (int8 K/V with a float32 scale per token and KV head: (Dh + 4) / (2 Dh) of bf16's bytes, 0.53x
    #: at Dh = 64; sampler log-probs drift from a float32 cache, see the README's "Rollouts" section).
    kv_cache_dtype: Literal["compute", "int8"] = "compute"
    #: slots: sample slots decoded together (0: the step's B x G rows, rounded up to a power of 2).
    rollout_slots: int = 0
    #: slots: decode steps per host round-trip.
    rollout_steps_per_sync: int = 16
    #: PPO clip range: ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: 0.2 / 0.28).
    clip_low: float = 0.2
    clip_high: float = 0.28
    #: Dual-clip constant for negative advantages (0: off).
    clip_ratio_c: float = 0.0
    #: token (GRPO/DAPO) | sequence (GSPO; needs loss_agg_mode: seq-mean-token-mean, as verl forces).
    ratio_level: Literal["token", "sequence"] = "token"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                           "seq-mean-token-sum-norm"] = "token-mean"
    #: Dr.GRPO constant normaliser for seq-mean-token-sum-norm (0: max_new_tokens).
    loss_norm_length: int = 0
    #: grpo (mean/std) | drgrpo (no std) | rloo (leave-one-out).
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    #: KL to a frozen reference policy (0: off, as in DAPO / URPO).
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    #: Clamp of the per-token k3 KL value to [-kl_clamp, kl_clamp] (verl: 10; 0: off); where it
    #: binds, the token gets no KL gradient.
    kl_clamp: float = 10.0
    entropy_coef: float = 0.0
    #: Passes over each step's samples, and optimizer steps per pass.
    ppo_epochs: int = 1
    mini_batches: int = 1
    #: Train/infer mismatch correction against the sampler's unfiltered log-probs (at `temperature`,
    #: before top-k/top-p), w = exp(old - sampler), old recomputed by the trainer whenever a
    #: correction is on. tis_cap: truncated-IS cap, pg *= min(w, tis_cap) (0: off; verl
    #: `rollout_is_threshold`).
    tis_cap: float = 0.0
    #: TIS weight per token, or one per sequence (product of the token ratios; verl `rollout_is`).
    tis_level: Literal["token", "sequence"] = "token"
    #: Masked IS / rejection (verl `rollout_rs`; token = IcePop): tokens, or whole sequences (product
    #: ratio), whose w leaves [1/c, c] drop out of the loss and its denominator (none: off).
    is_mask: Literal["none", "token", "sequence"] = "none"
    #: c > 1 of is_mask (verl `rollout_rs_threshold`, lower bound 1/c).
    is_mask_threshold: float = 2.0
    #: DAPO dynamic sampling: drop zero-variance groups and sample more prompts to refill.
    dynamic_sampling: bool = False
    #: What dynamic sampling tests for zero variance (verl's `filter_groups.metric`): acc = the
    #: task verifier's correctness (score for tasks without one), score = task reward before overlong
    #: shaping, seq_final_reward = the shaped reward. DAPO filters on accuracy.
    dynamic_sampling_metric: Literal["acc", "score", "seq_final_reward"] = "acc"
    #: Cap on extra generation rounds per step for dynamic sampling.
    max_sampling_rounds: int = 3
    #: DAPO soft overlong punishment: the last `overlong_buffer` tokens before max_new_tokens ramp
    #: the penalty from 0 to `overlong_penalty` (0: off).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    #: Exclude truncated samples (no stop token) from the loss.
    mask_truncated: bool = False
    #: Held-out evaluation prompts per task.
    eval_size: int = 128
    tasks: list[TaskSpec] = dataclasses.field(default_factory=lambda: [TaskSpec()])

    def validate(self, key="grpo"):
        check(self.num_samples >= 2, f"{key}.num_samples", "must be >= 2 for group-relative advantages")
        check(self.prompts_per_step > 0, f"{key}.prompts_per_step", "must be > 0")
        check(self.max_new_tokens > 0 and self.max_prompt_length > 0, f"{key}.max_new_tokens",
              "max_new_tokens and max_prompt_length must be > 0")
        check(self.temperature > 0, f"{key}.temperature", "must be > 0")
        check(0 < self.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, f"{key}.top_k", "must be >= 0")
        check(self.rollout_slots >= 0, f"{key}.rollout_slots", "must be >= 0 (0: B x G)")
        check(self.rollout_steps_per_sync >= 1, f"{key}.rollout_steps_per_sync", "must be >= 1")
        check(0 <= self.clip_low < 1, f"{key}.clip_low", "must be in [0, 1)")
        check(self.clip_high >= self.clip_low, f"{key}.clip_high", f"must be >= clip_low={self.clip_low}")
        check(self.clip_ratio_c == 0 or self.clip_ratio_c > 1 + self.clip_high, f"{key}.clip_ratio_c",
              "must be 0 (off) or > 1 + clip_high")
        check(self.kl_coef >= 0, f"{key}.kl_coef", "must be >= 0")
        check(self.kl_clamp >= 0, f"{key}.kl_clamp", "must be >= 0 (0: off)")
        check(self.ratio_level != "sequence" or self.loss_agg_mode == "seq-mean-token-mean",
              f"{key}.loss_agg_mode", f"ratio_level: sequence (GSPO) requires loss_agg_mode: seq-mean-token-mean "
              f"(got {self.loss_agg_mode}; any other mode weights the sequence ratio by length, as verl forbids)")
        check(self.tis_cap >= 0, f"{key}.tis_cap", "must be >= 0 (0: off)")
        check(self.tis_level == "token" or self.tis_cap > 0, f"{key}.tis_level",
              f"tis_level: {self.tis_level} has no effect without tis_cap > 0")
        check(self.is_mask == "none" or self.is_mask_threshold > 1, f"{key}.is_mask_threshold",
              "must be > 1 (ratios outside [1/c, c] are masked)")
        check(self.ppo_epochs >= 1, f"{key}.ppo_epochs", "must be >= 1")
        rows = self.num_samples * self.prompts_per_step
        check(self.mini_batches >= 1 and rows % self.mini_batches == 0, f"{key}.mini_batches",
              f"must divide num_samples * prompts_per_step = {rows}")
        check(0 <= self.overlong_buffer < self.max_new_tokens, f"{key}.overlong_buffer",
              f"must be in [0, max_new_tokens={self.max_new_tokens})")
        check(self.max_sampling_rounds >= 0, f"{key}.max_sampling_rounds", "must be >= 0")
        check(bool(self.tasks), f"{key}.tasks", "needs at least one task")
        names = [t.name for t in self.tasks]
        check(len(set(names)) == len(names), f"{key}.tasks", f"task names must be unique, got {names}")
        for i, t in enumerate(self.tasks):
            check(t.ratio > 0, f"{key}.tasks[{i}].ratio", "must be > 0")
            check(t.start_step >= 0, f"{key}.tasks[{i}].start_step", "must be >= 0")
            check(bool(t.rewards), f"{key}.tasks[{i}].rewards", "needs at least one reward source")
        check(any(t.start_step == 0 for t in self.tasks), f"{key}.tasks",
              "at least one task must start at step 0 (start_step=0)")


@dataclasses.dataclass
class RMConfig:
    """Reward-model training: tasks rm_bt, polar_pretrain, polar_finetune (jaxrl_rm.train.reward_model).

    Their `data.train` / `data.eval` name a JSONL(.gz) / parquet file of the stage's records
    (rm_bt: {prompt, chosen, rejected[, subset]}; polar_pretrain: {prompt, a1, a2, b1};
    polar_finetune: {prompt, reference, chosen, rejected}), or `hh_rlhf:<file>` (Anthropic
    transcripts -> pairs), `alpaca_eval:<dir>` (outputs + judge annotations -> ranked triples; for
    rm_bt the pairs without the reference), or `synthetic:<task>` (jaxrl_rm.data.synthetic.RM_TASKS).
    """

    #: BT margin m: per-pair loss -log sigmoid(r_chosen - r_rejected - m); 0 = no margin.
    margin: float = 0.0
    #: Reward centering: adds center_coef * (r_chosen + r_rejected)^2 per pair (Eisenstein et al. 2023); 0 = off.
    center_coef: float = 0.0
    #: End every response with the tokenizer's eos before scoring (a cut response loses it).
    append_eos: bool = True
    #: POLAR inputs: prompt tokens kept (its tail, in each copy) when long responses must be cut; -1 = data.max_length // 8.
    min_prompt_tokens: int = -1
    #: With data.eval empty and a file source: share of the training prompts held out for evaluation (split by prompt, seeded).
    eval_fraction: float = 0.1
    #: Evaluate at most this many held-out pairs / triples / quads (0 = all; a seeded subset otherwise).
    eval_size: int = 512
    #: Rows per forward pass when scoring held-out data.
    eval_batch_size: int = 64
    #: alpaca_eval sources: minimum gap between two generators' judge preferences to form a ranked pair.
    alpaca_min_gap: float = 0.1
    #: After training, write the RM and its tokenizer as an HF directory <run_dir>/hf (loadable by `model.path`).
    export_hf: bool = True

    def validate(self, key="rm"):
        check(self.center_coef >= 0, f"{key}.center_coef", "must be >= 0")
        check(self.min_prompt_tokens >= -1, f"{key}.min_prompt_tokens", "must be -1 (auto) or >= 0")
        check(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", "must be in [0, 1)")
        check(self.eval_size >= 0, f"{key}.eval_size", "must be >= 0")
        check(self.eval_batch_size > 0, f"{key}.eval_batch_size", "must be > 0")
        check(self.alpaca_min_gap >= 0, f"{key}.alpaca_min_gap", "must be >= 0")


@dataclasses.dataclass
class PolicySpec:
    """One policy of a POLAR data-synthesis pool, with its own sampling settings."""

    #: Name written into the quads (policy_a / policy_b); empty = derived from `path` (or `seed`).
    name: str = ""
    #: An HF causal-LM directory; a run directory (its config.yaml + latest orbax checkpoint, e.g. an
    #: SFT run); `synthetic:style:<k>` (built-in style policy k); empty = random init of `model.*` with `seed`.
    path: str = ""
    #: Seed of a random-init policy (`path` empty).
    seed: int = 0
    #: Sampling settings (the paper's: temperature 1.0, top-p 0.9, top-k 50).
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    #: Completion budget in tokens (a longer answer is cut).
    max_new_tokens: int = 64


def _default_policies() -> list:
    return [PolicySpec(name="random0", seed=0), PolicySpec(name="random1", seed=1)]


@dataclasses.dataclass
class PolarDataConfig:
    """POLAR pretraining-data synthesis (task polar_data, jaxrl_rm.train.polar_data): for each prompt
    pick two different policies, sample two answers from the first and one from the second, write
    `{prompt, a1, a2, b1, policy_a, policy_b, id}` JSONL. Deterministic given `seed`; resumable."""

    #: Output JSONL of quads; empty = <run_dir>/quads.jsonl. An existing file is resumed (its complete lines are kept).
    output: str = ""
    #: Prompt source: JSONL(.gz) of instructions (field data.prompt_field) or of documents (field `text_field`;
    #: `.txt`: one document per line) for prefix mode, or synthetic:style_prompts.
    prompts: str = "synthetic:style_prompts"
    #: instruction: prompts used as given (policies' chat templates applied if `chat_template`) |
    #: prefix: a random head of min..max_prefix_tokens tokens of each document (cut back to a whole
    #: character), continued as raw text.
    prompt_kind: Literal["instruction", "prefix"] = "instruction"
    #: Document field of a JSONL corpus (prefix mode).
    text_field: str = "text"
    #: Prefix length range in tokens of the `model.tokenizer` (the paper: 1..1024).
    min_prefix_tokens: int = 1
    max_prefix_tokens: int = 32
    #: Prompts to use (0 = the whole source; a synthetic source needs > 0).
    num_prompts: int = 64
    #: Prompts per generation chunk (the unit of batching and of resumption).
    batch_size: int = 16
    #: Render instruction prompts with each LM policy's chat template (when it has one).
    chat_template: bool = True
    #: The policy pool (at least two).
    policies: list[PolicySpec] = dataclasses.field(default_factory=_default_policies)

    def validate(self, key="polar_data"):
        check(self.min_prefix_tokens >= 1, f"{key}.min_prefix_tokens", "must be >= 1")
        check(self.max_prefix_tokens >= self.min_prefix_tokens, f"{key}.max_prefix_tokens",
              f"must be >= min_prefix_tokens={self.min_prefix_tokens}")
        check(self.num_prompts >= 0, f"{key}.num_prompts", "must be >= 0")
        check(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        check(len(self.policies) >= 2, f"{key}.policies", f"needs at least two policies, got {len(self.policies)}")
        for i, p in enumerate(self.policies):
            check(p.temperature > 0, f"{key}.policies[{i}].temperature", "must be > 0")
            check(0 < p.top_p <= 1, f"{key}.policies[{i}].top_p", "must be in (0, 1]")
            check(p.top_k >= 0, f"{key}.policies[{i}].top_k", "must be >= 0")
            check(p.max_new_tokens > 0, f"{key}.policies[{i}].max_new_tokens", "must be > 0")


@dataclasses.dataclass
class WarmupConfig:
    """Optional SFT stage before RL (RL pipelines): trains `model` on (prompt -> gold answer) and
    starts RL from it. The SFT run lives in `<run_dir>/sft_warmup` (its HF export in `.../hf`)."""

    #: SFT steps before RL (0: no warm-up; RL starts from `model.path` or a random init).
    steps: int = 0
    batch_size: int = 32
    learning_rate: float = 3e-3
    #: The warm-up's own learning-rate schedule and linear warm-up steps (the rest of the optimizer,
    #: b1/b2/clip, is `optim`'s). A decaying schedule matters: a constant 3e-3 for 200 steps leaves a
    #: tiny policy wherever float rounding sends it (0.26 / 0.53 / 0.77 held-out reversal accuracy
    #: from three CPU instruction sets), and every RL figure downstream moves with it.
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 10
    #: SFT data; empty: demonstrations of every task (gold answers, gold rankings, references; one
    #: task: its own data source).
    data: str = ""

    def validate(self, key="warmup"):
        check(self.steps >= 0, f"{key}.steps", "must be >= 0")
        check(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        check(self.learning_rate > 0, f"{key}.learning_rate", "must be > 0")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")


@dataclasses.dataclass
class JudgeConfig:
    """J1 judge training (task judge_j1, jaxrl_rm.train.judge): on-policy judgment data, an optional
    format warm-up, then GRPO of the judge with the score-match reward (RLLM / J1).

    Stage "data": sample `responses_per_prompt` answers per problem from a sampler, label each with
    the teacher (a verifier against the gold answer), drop duplicates and empty answers, balance the
    labels, write `<run_dir>/judge_data/{train,eval}.jsonl` (JudgmentExample). Stage "warmup": SFT
    of the judge on the training judgments so it emits `<think>..</think><score>..</score>`; the
    warm-up's scores are the teacher label with probability 1 - `warmup_label_noise`, else random,
    so it teaches the format without (all of) the labels. Stage "rl": GRPO on a `kind: judgment`
    task with the `score_match` reward; held-out `judge_accuracy` before and after RL goes to the
    summary (`judge_accuracy_before/_after/_gain`), and so does the gold-vs-near-miss AUC on
    held-out problems (`judge_near_miss_auc_before/_after`). `grpo.*` sets the RL (its `tasks` are replaced);
    `model.*` is the architecture of random-init policy / judge models.
    """

    #: Problems with gold answers: synthetic:<task>, a JSONL of {prompt, answer} (VerifiableProblem),
    #: `gsm8k:<path>` or `math:<path>` (see TaskSpec.data).
    problems: str = "synthetic:reverse"
    #: Held-out problems (same forms); empty: the held-out synthetic split (a file source needs one).
    eval_problems: str = ""
    #: Training / held-out problems to use.
    num_train_prompts: int = 1024
    num_eval_prompts: int = 256
    #: The policy whose answers are judged (HF dir). Empty: SFT one (random init of `model.*`) on `problems`.
    policy_path: str = ""
    #: SFT steps / learning rate / batch size of that policy (when `policy_path` is empty).
    policy_sft_steps: int = 200
    policy_sft_lr: float = 3.0e-3
    policy_sft_batch_size: int = 32
    #: Who answers the training problems: policy (on-policy J1) | corrupt (off-policy: a rule-based
    #: "other model" writing gold answers with random edits) | an HF model directory (off-policy).
    train_sampler: str = "policy"
    #: Who answers the held-out problems (same choices); the judge is measured where it will be used.
    eval_sampler: str = "policy"
    #: corrupt sampler: probability that an answer is the unedited gold one.
    corrupt_p_correct: float = 0.5
    #: Answers sampled per problem, and their sampling settings.
    responses_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 8
    #: Teacher: exact_match | verifier (math-verify) against the gold answer | path_check (the
    #: constraints a `synthetic:paths` prompt states; any valid walk is right).
    teacher: Literal["exact_match", "verifier", "path_check"] = "exact_match"
    #: Downsample every label to the rarest label's count (per split).
    balance: bool = True
    #: What `balance` evens out in the *training* judgments: label (as above) | prompt (each
    #: prompt keeps as many right as wrong answers, prompts with one label are dropped, so a judge
    #: cannot score by which prompts the policy gets wrong: J1's chosen / rejected pairs of one
    #: prompt). The held-out judgments are balanced by label either way.
    balance_by: Literal["label", "prompt"] = "label"
    #: Drop repeated (prompt, response) pairs.
    dedupe: bool = True
    #: Supplied judgment data (JSONL of {prompt, response, label[, reference]}): skips sampling and labelling.
    data: str = ""
    eval_data: str = ""
    #: Judge template (pointwise formats; see jaxrl_rm.rewards.judges.TEMPLATE_NAMES), and
    #: JudgeTemplate field overrides (e.g. a compact `user` text such as "{prompt}\n{aligned}").
    template: str = "pointwise_correctness"
    template_options: dict = dataclasses.field(default_factory=dict)
    #: score_match tolerance |predicted - label|.
    tolerance: float = 0.0
    #: Judge initialisation: an HF dir | policy (the response policy) | empty (`model.path`, or random init of `model.*`).
    judge_init: str = ""
    #: Judge format warm-up SFT steps (0: none), batch size, learning rate.
    warmup_steps: int = 100
    warmup_batch_size: int = 32
    warmup_lr: float = 3.0e-3
    #: Warm-up judgments: balanced (the RL training set) | all (every labelled training judgment
    #: before balancing: more answers to learn the reasoning from; verdicts are random anyway at
    #: label noise 1.0).
    warmup_data: Literal["balanced", "all"] = "balanced"
    #: Share of warm-up judgments whose answer is replaced by a rule-made one (gold, gold with one
    #: random edit, a random string or a repeated character; exact-match teacher only): teaches the
    #: reasoning a check, not the policy's error patterns. The RL stage keeps the sampled judgments.
    warmup_corrupt: float = 0.0
    #: Share of warm-up targets whose score is random instead of the teacher label (1.0: format only).
    warmup_label_noise: float = 1.0
    #: Reasoning in warm-up targets: compare (works out the gold answer and sets the judged answer
    #: beside it: `want X, got Y`) | aligned (checks the `{aligned}` view pair by pair:
    #: `dd= cc= bxx`; needs a template showing `{aligned}`) | path (checks a `synthetic:paths` answer
    #: constraint by constraint: `ab+ bcx aa= cc= 33=`, `synthetic.path_written_check`) | reference (works out the gold answer)
    #: | response (restates the judged answer) | fixed (a constant sentence).
    warmup_think: WarmupThink = "reference"
    #: Held-out judgments evaluated before / after RL (0: all).
    eval_size: int = 256
    #: Gold-vs-near-miss AUC before / after RL (`judge_near_miss_auc_before/_after`, exact-match
    #: or path teacher; jaxrl_rm.eval.judge.evaluate_near_miss): the first `near_miss_prompts` distinct
    #: held-out problems of the evaluated judgments (0: off), each judged on its gold answer and
    #: `near_misses_per_prompt` one-edit near misses (seeded by `seed`); 48 x (1 + 4) = 240 judge
    #: prompts, one batch.
    near_miss_prompts: int = 48
    near_misses_per_prompt: int = 4

    def validate(self, key="judge"):
        check(bool(self.problems) or bool(self.data), f"{key}.problems", "must name problems (or set judge.data)")
        check(self.num_train_prompts > 0, f"{key}.num_train_prompts", "must be > 0")
        check(self.num_eval_prompts > 0, f"{key}.num_eval_prompts", "must be > 0")
        check(self.policy_sft_steps >= 0, f"{key}.policy_sft_steps", "must be >= 0")
        check(self.responses_per_prompt >= 1, f"{key}.responses_per_prompt", "must be >= 1")
        check(self.temperature > 0, f"{key}.temperature", "must be > 0")
        check(self.max_new_tokens > 0, f"{key}.max_new_tokens", "must be > 0")
        check(0 <= self.corrupt_p_correct <= 1, f"{key}.corrupt_p_correct", "must be in [0, 1]")
        check(self.tolerance >= 0, f"{key}.tolerance", "must be >= 0")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(self.warmup_batch_size > 0, f"{key}.warmup_batch_size", "must be > 0")
        check(0 <= self.warmup_label_noise <= 1, f"{key}.warmup_label_noise", "must be in [0, 1]")
        check(0 <= self.warmup_corrupt <= 1, f"{key}.warmup_corrupt", "must be in [0, 1]")
        check(self.warmup_corrupt == 0 or self.teacher in RULE_LABELLED_TEACHERS, f"{key}.warmup_corrupt",
              "needs teacher exact_match or path_check (corrupted answers are labelled by exact match or the path check)")
        check(self.eval_size >= 0, f"{key}.eval_size", "must be >= 0")
        check(not self.eval_data or bool(self.data), f"{key}.eval_data", "needs judge.data (supplied training judgments) too")
        check(self.near_miss_prompts >= 0, f"{key}.near_miss_prompts", "must be >= 0")
        check(self.near_misses_per_prompt >= 1, f"{key}.near_misses_per_prompt", "must be >= 1")
        from jaxrl_rm.rewards.judges import TEMPLATE_NAMES

        check(self.template in TEMPLATE_NAMES and not self.template.startswith(("pairwise", "listwise")),
              f"{key}.template", f"must be a pointwise template, one of "
              f"{[t for t in TEMPLATE_NAMES if t.startswith('pointwise')]}")
        from jaxrl_rm.rewards.judges import get_template

        try:
            tpl = get_template(self.template, **self.template_options)
        except (TypeError, ValueError) as e:
            check(False, f"{key}.template_options", str(e))
        check(self.warmup_think != "aligned" or "aligned" in tpl.placeholders, f"{key}.warmup_think",
              "aligned reasoning needs a template that shows {aligned} (judge.template_options.user)")


@dataclasses.dataclass
class DebugConfig:
    #: Fault injection for reliability tests: steps (0-based) whose loss and gradients are made NaN.
    nan_steps: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageSpec:
    """One stage of a `task: pipeline` run: another config, run in `<run_dir>/<name>`."""

    name: str = "stage"
    #: Config file of the stage (relative to the working directory, like --config).
    config: str = ""
    #: key=value overrides for the stage; `{run_dir}` is replaced by the pipeline's run_dir, so a
    #: stage can use an earlier stage's output, e.g. `model.path={run_dir}/sft/hf`.
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ClaimSpec:
    """One row of a pipeline's claims table (`results.md`): a paper's claim checked by comparing
    two numbers of the pipeline's summary (keys `<stage>/<metric>`, each averaged over the keys
    listed). Reproduced when `ours` beats `baseline` in `direction` by more than `margin`; a
    negative margin reads "matches or beats": ours may trail by up to |margin|. A key that is
    missing (stage not run) leaves the row 'not run'. In a pipeline run over several `seeds`
    the row compares the means over seeds and shows each side's range and how many seeds agree."""

    claim: str = ""
    #: Where the claim comes from (paper, section).
    paper: str = ""
    #: What is compared (shown in the table).
    metric: str = ""
    ours: list[str] = dataclasses.field(default_factory=list)
    baseline: list[str] = dataclasses.field(default_factory=list)
    #: The paper's direction: ours higher (or lower) than the baseline.
    direction: Literal["higher", "lower"] = "higher"
    margin: float = 0.0

    def validate(self, key="claims"):
        check(bool(self.claim), f"{key}.claim", "must describe the claim")
        check(bool(self.ours) and bool(self.baseline), f"{key}.ours", "ours and baseline must name summary keys")


@dataclasses.dataclass
class Config:
    #: Which pipeline runs: sft | grpo | rm_bt (Bradley–Terry RM) | polar_pretrain | polar_finetune (POLAR RM)
    #: | polar_data (POLAR pretraining-data synthesis) | judge_j1 (J1 judge training, see `judge`).
    task: Literal["sft", "grpo", "rm_bt", "polar_pretrain", "polar_finetune", "polar_data", "judge_j1",
                  "pipeline"] = "sft"
    #: Output directory (config.yaml, metrics.jsonl, TensorBoard, summary.json, checkpoints/).
    run_dir: str = "runs/default"
    seed: int = 0
    #: auto: continue from the latest complete checkpoint in run_dir | never: start fresh.
    resume: Literal["auto", "never"] = "auto"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    warmup: WarmupConfig = dataclasses.field(default_factory=WarmupConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    #: Stages of a `task: pipeline` run (each a config + overrides), run in order.
    stages: list[StageSpec] = dataclasses.field(default_factory=list)
    #: Pipeline stages to compare at the end: results.md table, comparison.png, report/.
    compare: list[str] = dataclasses.field(default_factory=list)
    #: Metrics plotted in comparison.png (per step, one line per compared stage).
    compare_metrics: list[str] = dataclasses.field(default_factory=lambda: ["reward_mean", "accuracy"])
    #: Claims checked against the pipeline's summary at the end (a table in results.md).
    claims: list[ClaimSpec] = dataclasses.field(default_factory=list)
    #: Run a pipeline's stages once per seed, each seed in `<run_dir>/seed<k>` (`{run_dir}` in a
    #: stage's overrides names that folder, and every stage runs with `seed=<k>`): the summary
    #: holds the mean over seeds of every number (`<stage>/<metric>`) and the per-seed values
    #: (`<stage>/<metric>/seeds`), and the claims table the means with their range. Empty: one
    #: run, every stage at the pipeline's `seed`.
    seeds: list[int] = dataclasses.field(default_factory=list)
    #: Reward-model training (tasks rm_bt, polar_pretrain, polar_finetune).
    rm: RMConfig = dataclasses.field(default_factory=RMConfig)
    #: POLAR pretraining-data synthesis (task polar_data).
    polar_data: PolarDataConfig = dataclasses.field(default_factory=PolarDataConfig)
    #: J1 judge training (task judge_j1).
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)

    def validate(self) -> "Config":
        check(bool(self.run_dir), "run_dir", "must not be empty")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        for i, claim in enumerate(self.claims):
            claim.validate(f"claims[{i}]")
        check(all(isinstance(k, int) and not isinstance(k, bool) for k in self.seeds)
              and len(set(self.seeds)) == len(self.seeds), "seeds", f"must be distinct integers, got {self.seeds!r}")
        check(not self.seeds or self.task == "pipeline", "seeds", "runs a pipeline once per seed; this task is "
              f"{self.task!r} (set `seed` for one run)")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (or the built-in defaults when `path` is None) + `key=value` overrides -> Config."""
    data = read_yaml(path) if path else {}
    for override in overrides:
        data = apply_override(data, override)
    return from_dict(Config, data).validate()

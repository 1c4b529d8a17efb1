r"""Generative judges as reward sources: RLLM's LM-as-RM, URPO's self-rewarding, and J1's judge reward.

Three reward types register here (``grpo.tasks[].rewards[].type``):

``judge``
    A separate judge model: ``path`` is an HF directory (weights + tokenizer), e.g. the ``hf/``
    export of a ``judge_j1`` run. The judge scores the policy's G rollouts of each prompt.
``self_judge``
    URPO (Sec. 3.2.2): the *live* GRPO policy judges its own rollouts (``ctx["grpo"]``'s
    ``current_params``, updated every step). Default mode ``listwise`` with URPO's template.
``score_match``
    J1 / RLLM judge training: the policy *is* the judge (task kind ``judgment``); each rollout is
    a judgment ``<think>…</think><score>x</score>`` of ``item.responses[0]``, parsed with the
    task's template; reward 1 when the score equals ``item.label`` (a bool label maps to the
    template's max / min score, i.e. 1 / 0 for ``pointwise_correctness``; ``tolerance`` allows
    a numeric gap), else 0; invalid → ``invalid_reward`` (0). Master-key / empty / reasoning-free
    judge outputs are invalid (the parsers' guards) and counted in ``guard_report()``. With
    ``truncated_reward`` set, a judgment cut by the length limit (no stop token) earns it whatever
    it parses to (the J1 pipeline uses 0: a judge must finish its judgment).

Modes of ``judge`` / ``self_judge`` (``options.mode``), for one group of G rollouts, k =
``options.num_judgments`` judge samples per judge prompt:

============  =========================================  ==============================  ==============================
mode          judge prompts per group ("calls")          template (default)              reward of rollout i
============  =========================================  ==============================  ==============================
``pointwise`` G (each rollout alone)                     ``pointwise`` (0–10)            mean of its k normalised scores
``pairwise``  G(G−1): every ordered pair (i, j), i ≠ j   ``pairwise`` (``[[A]]``/``[[B]]``)  mean of its own score in all its
                                                                                         comparisons (``outcome``: its win
                                                                                         rate)
``pivot``     2G: (i, p) and (p, i) for every rollout i, ``pairwise``                    its own score in its two
              the pivot p (random, seeded) included                                      comparisons with p; the pivot's:
              (``pivot_reward: win_rate``: 2(G−1), no                                    its comparison with itself
              comparison of p with itself)                                               (``win_rate``: its score / win
                                                                                         rate vs all others)
``listwise``  1 (all G in one prompt), or with           ``listwise`` (URPO ``\boxed{}``)  mean of its normalised scores
              ``subset_size`` s < G: ⌈G/s⌉ per round,
              ``subset_rounds`` rounds of random subsets
              (a last subset of one joins the previous)
============  =========================================  ==============================  ==============================

Scores are normalised to [0, 1]: ``(s − min_score) / (max_score − min_score)`` of the template.
Pairwise and pivot modes also take a listwise template (a ranking judge, e.g. URPO's, shown the two
responses as a list of 2).

What a pairwise comparison credits (``options.pairwise_reward``):
``score`` (default; fairseq2's RLLM recipe): with a template that scores both responses
(``pairwise_scores``, or a listwise template shown the pair) each side is credited with *its own*
normalised score (9 vs 8.9 gives 0.9 and 0.89, not a win and a loss); a verdict template
(``pairwise``) has no scores, so its outcomes are used. Invalid judgments count for nothing; a
rollout with no valid judgment gets ``invalid_reward`` (0).
``outcome``: a win 1, a loss 0, a tie (equal scores) ``tie_reward`` (0.5), an invalid verdict
``invalid_verdict`` (0.5, neutral) for both sides.
Pivot mode (``options.pivot_reward``): ``self`` (default; fairseq2) judges the pivot against itself
too and credits only the non-pivot slot of each comparison, so every rollout, the pivot included,
is rated the same way against the same opponent; ``win_rate`` credits both slots (the pivot gets its
score / win rate over its comparisons with all others) and makes no self-comparison.
Pointwise / listwise: the mean over the *valid* samples; a rollout with none gets ``invalid_reward``
(0).

Expected scores (``options.score_expectation: true``; pointwise mode, a ``<score>`` template with
integer scores): each valid judgment pays the judge's expected normalised score at its verdict,
Σ_s P(s) norm(s) over the template's scores, from one teacher-forced pass over the judgment up to
its number (:meth:`TextJudge.continuation_logprobs`), instead of the one score it decoded: a judge
60 % sure of "1" pays 0.6. Logs ``expectation_gap`` (mean |expected − decoded|).

Evaluation (``eval_reward/<task>``, ``win_rate/<task>``) judges through :meth:`JudgeSource.for_eval`:
greedy verdicts (``options.eval_num_judgments: 0``, the default), or the mean of
``eval_num_judgments`` samples at the judge's temperature, so an evaluation measures the policy and
not the judge's sampling noise.

Guards (``options.guards``, on by default; see :mod:`.guards`): a judged rollout that is empty, a
master key (``":"``, ``"Thought process:"``…), a repetition or a prompt echo is never shown to the
judge: its reward is 0, and in pairwise mode every comparison with it is won by the other side
(1: a win, or the top score; no call). Counts are in ``guard_report()`` (the run summary's ``reward_guard``).

Metrics (prefixed by the source name): ``judge_calls`` (judge prompts this step),
``judge_samples`` (calls × k), ``calls_per_group``, ``invalid_rate`` (invalid parses / samples),
``position_bias_rate`` (pairwise modes: of the pairs judged in both orders with two valid
non-tie verdicts, the fraction whose winner flips with the order), ``mean_score`` (mean
normalised score / win rate of the valid judgments), ``guarded_rate``.

All judge prompts of a step go through :class:`TextJudge`: one ``generate`` call per
``batch_size`` prompts (jitted, bucketed; prompts keep their *tail* when longer than
``max_prompt_length``). Sampling seeds and pivots are a pure function of (seed, the step's
prompts and rollouts), so a resumed run judges identically.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import re
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.rewards.guards import GuardConfig, GuardCounter, check_text
from jaxrl_rm.rewards.judges import JudgeTemplate, get_template, task_template
from jaxrl_rm.rewards.judgment import score_match_reward
from jaxrl_rm.rewards.parsers import NUMBER_PATTERN, ParseResult, verdict_from_scores
from jaxrl_rm.rewards.sources import Rollouts, register

MODES: tuple[str, ...] = ("pointwise", "pairwise", "pivot", "listwise")
PAIRWISE_REWARDS: tuple[str, ...] = ("score", "outcome")
PIVOT_REWARDS: tuple[str, ...] = ("self", "win_rate")
DEFAULT_TEMPLATES = {"pointwise": "pointwise", "pairwise": "pairwise", "pivot": "pairwise", "listwise": "listwise"}
_MODE_FORMATS = {
    "pointwise": ("pointwise",),
    "pairwise": ("pairwise", "pairwise_scores", "listwise", "listwise_tags"),
    "pivot": ("pairwise", "pairwise_scores", "listwise", "listwise_tags"),
    "listwise": ("listwise", "listwise_tags"),
}


# ============================================================================ helpers


def prompt_as_text(prompt: Any) -> str:
    """A prompt for a judge template's ``{prompt}``: strings as they are; a chat message list as
    ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def content_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from ``seed`` and content (stable across processes and runs)."""
    h = hashlib.blake2b(repr((seed,) + parts).encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def label_score(label: Any, template: JudgeTemplate) -> float:
    """Teacher label -> target score: ``True``/``False`` -> the template's max / min score; numbers as they are."""
    if isinstance(label, (bool, np.bool_)):
        return float(template.max_score if label else template.min_score)
    return float(label)


#: a pointwise answer tag and the number in it (group 1), as `parsers.parse_pointwise` accepts it
_SCORE_VALUE_RE = re.compile(rf"<score>\s*({NUMBER_PATTERN})\s*</score>")


def normalise(score: float, template: JudgeTemplate) -> float:
    """Score in [min_score, max_score] -> [0, 1]."""
    span = template.max_score - template.min_score
    return 0.5 if span <= 0 else float((score - template.min_score) / span)


def guard_config(value: Any) -> GuardConfig | None:
    """``options.guards``: true (defaults) | false (off) | a dict of GuardConfig fields."""
    if value is None or value is True:
        return GuardConfig()
    if value is False:
        return None
    if isinstance(value, dict):
        kw = dict(value)
        if "extra_master_keys" in kw:
            kw["extra_master_keys"] = tuple(kw["extra_master_keys"])
        return GuardConfig(**kw)
    if isinstance(value, GuardConfig):
        return value
    raise ValueError(f"judge option guards must be true, false or a dict of GuardConfig fields, got {value!r}")


def pairwise_outcome(result: ParseResult) -> float | None:
    """Outcome for response A of one pairwise judgment: 1 (A wins), 0 (B wins), 0.5 (tie), None (invalid)."""
    if result.valid and isinstance(result.value, tuple):
        v = verdict_from_scores(result)
        if v.valid:
            return 1.0 if v.value == "A" else 0.0
        return 0.5 if v.reason == "tie" else None
    if result.valid:
        if result.value == "A":
            return 1.0
        if result.value == "B":
            return 0.0
        return 0.5  # an extra verdict label (e.g. "C" for a tie)
    return None


# ============================================================================ generation


class TextJudge:
    """Samples judge outputs for rendered judge prompts with a language model.

    model_fn: () -> `Transformer` (called once per batch of prompts, so a self-judge sees the
      current policy weights). Prompts are token-encoded, keep their last `max_prompt_length`
      tokens (default: the model's context minus `max_new_tokens`), and are sampled through
      `jaxrl_rm.rollout.RolloutCollector` in chunks of `batch_size` prompts. Stops at the
      tokenizer's eos.
    rollout_engine: `static` (one bucketed batch per chunk) or `slots` (the continuous-batching
      `SlotEngine`). With `slots`, judge prompts that share a prefix (template + question +
      reference, followed by different responses) prefill it once per chunk and read one stored
      copy: `max_prefix_len` caps the shared part (default: the prompt budget; 0 turns it off).

    `judge.generate(texts, num_samples=k, seed=s)` -> `[len(texts)][k]` decoded outputs (greedy:
    each distinct text is decoded once);
    `judge(texts)` -> one output per text (the protocol `jaxrl_rm.eval.judge` uses).
    """

    def __init__(self, model_fn: Callable[[], Any], tokenizer, *, max_prompt_length: int | None = None,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 greedy: bool = False, batch_size: int = 64, mesh=None, seed: int = 0,
                 rollout_engine: str = "static", max_prefix_len: int | None = None):
        from jaxrl_rm.rollout.collect import ENGINES

        if rollout_engine not in ENGINES:
            raise ValueError(f"judge rollout_engine must be one of {list(ENGINES)}, got {rollout_engine!r}")
        self.model_fn, self.tokenizer = model_fn, tokenizer
        self.rollout_engine = rollout_engine
        self.max_prefix_len = None if max_prefix_len is None else int(max_prefix_len)
        self.max_prompt_length = None if max_prompt_length is None else int(max_prompt_length)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.top_k, self.greedy = float(temperature), float(top_p), int(top_k), bool(greedy)
        self.batch_size, self.mesh, self.seed = max(int(batch_size), 1), mesh, int(seed)
        self.eos = [t for t in {tokenizer.eos_token_id} if t is not None]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.generate_calls = 0

    def generate(self, texts: Sequence[str], *, num_samples: int = 1, seed: int | None = None) -> list[list[str]]:
        from jaxrl_rm.data.pipeline import encode
        from jaxrl_rm.rollout.collect import RolloutCollector

        if not texts:
            return []
        if self.greedy and (len(set(texts)) < len(texts) or num_samples > 1):
            # greedy decoding is a function of the prompt: judge each distinct prompt once (a policy
            # that has converged repeats answers, so groups hold many identical judge prompts)
            unique = list(dict.fromkeys(texts))
            once = dict(zip(unique, self.generate(unique, num_samples=1, seed=seed)))
            return [once[t] * num_samples for t in texts]
        seed = self.seed if seed is None else int(seed)
        model = self.model_fn()
        budget = self.prompt_budget(model)
        prefix = budget if self.max_prefix_len is None else self.max_prefix_len
        collector = RolloutCollector(engine=self.rollout_engine, max_prompt_len=budget,
                                     max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                     top_p=self.top_p, top_k=self.top_k, stop_token_ids=self.eos, pad_id=self.pad,
                                     mesh=self.mesh, max_prefix_len=prefix if self.rollout_engine == "slots" else 0)
        self.last_rollout_stats = []
        out: list[list[str]] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [encode(self.tokenizer, t) for t in texts[start:start + self.batch_size]]
            res = collector.generate(model, chunk, num_samples=num_samples, seed=content_seed(seed, start),
                                     greedy=self.greedy)
            self.generate_calls += 1
            self.last_rollout_stats.append(collector.stats)
            tokens, mask = np.asarray(res.tokens), np.asarray(res.mask)
            decoded = self.tokenizer.batch_decode([row[m] for row, m in zip(tokens, mask)], skip_special_tokens=True)
            out += [decoded[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk))]
        return out

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return [o[0] for o in self.generate(texts, num_samples=1)]

    def prompt_budget(self, model) -> int:
        """Prompt tokens kept (the tail): `max_prompt_length`, else the model's context minus
        `max_new_tokens`."""
        return self.max_prompt_length or max(model.config.max_position_embeddings - self.max_new_tokens, 1)

    def continuation_logprobs(self, prefixes: Sequence[str], continuations: Sequence[str], *,
                              prompt_chars: Sequence[int] | None = None) -> np.ndarray:
        """`[len(prefixes), len(continuations)]` float32: log P(c | prefix) under the judge, each
        `prefix + c` encoded as one string (`data.pipeline.encode_pieces`), at the judge's sampling
        temperature (1 when greedy). One teacher-forced forward per `batch_size` rows (right-padded
        to a bucketed length: a causal model's real tokens never see the padding).

        prompt_chars: how many leading characters of each prefix were the judge's prompt, the rest
          being what the judge then wrote. Generation kept the prompt's last `prompt_budget` tokens
          and everything it wrote after them, so a prefix drops exactly the prompt tokens generation
          dropped, not a tail of prompt + judgment (which cut the start of the prompt off once the
          two together exceeded the budget). None: each prefix is all prompt (its tail within the
          budget)."""
        from jaxrl_rm.data.pipeline import encode, encode_pieces
        from jaxrl_rm.sampling.sampler import bucket_length

        model = self.model_fn()
        budget = self.prompt_budget(model)
        rows, spans = [], []  # ids of each (prefix, continuation); where its continuation starts / ends
        for i, prefix in enumerate(prefixes):
            head, tails = encode_pieces(self.tokenizer, prefix, list(continuations))
            prompt = len(head) if prompt_chars is None else len(encode(self.tokenizer, prefix[:prompt_chars[i]]))
            head = head[max(min(prompt, len(head)) - budget, 0):] or [self.pad]
            for tail in tails:
                rows.append(head + tail)
                spans.append((len(head), len(head) + len(tail)))
        temperature = 1.0 if self.greedy else self.temperature
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = bucket_length(max(len(r) for r in chunk))
            ids = np.full((len(chunk), width), self.pad, np.int32)
            keep = np.zeros((len(chunk), width), bool)  # positions whose *next* token is scored
            for i, (r, (a, b)) in enumerate(zip(chunk, spans[start:start + self.batch_size])):
                ids[i, :len(r)] = r
                keep[i, a - 1:b - 1] = True
            out[start:start + len(chunk)] = np.asarray(_sum_next_token_logprobs(
                model, jnp.asarray(ids), jnp.asarray(keep), temperature=temperature))
        return out.reshape(len(prefixes), len(continuations))


@functools.partial(nnx.jit, static_argnames=("temperature",))
def _sum_next_token_logprobs(model, ids, keep, *, temperature: float):
    """Σ over positions t with `keep[:, t]` of log p(ids[:, t+1] | ids[:, :t+1]) -> `[B]` float32."""
    from jaxrl_rm.kernels import token_logprobs

    hidden = model.hidden_states(ids)[:, :-1]
    b, t, d = hidden.shape
    logp = token_logprobs(hidden.reshape(b * t, d), model.lm_head_weight(), ids[:, 1:].reshape(-1),
                          temperature=temperature).reshape(b, t)
    return jnp.where(keep[:, :-1], logp, 0.0).sum(-1)


# ============================================================================ judge reward source


@dataclasses.dataclass
class _Request:
    group: int
    members: tuple[int, ...]  # rollout indices in the order shown (1 for pointwise, 2 for pairwise, n for listwise)
    text: str
    pivot_slot: int | None = None  # pivot mode: the position (0 = A, 1 = B) the pivot is shown in


class JudgeSource:
    """Rewards `[B, G]` from a generative judge (see module docstring for modes and options).

    judge: a callable with ``generate(texts, num_samples=, seed=)`` (a :class:`TextJudge`, or a
      scripted stand-in in tests). tokenizer: renders templates through its chat template
      (None: plain text).
    """

    def __init__(self, judge, tokenizer=None, *, name: str = "judge", mode: str = "pointwise",
                 template: str | JudgeTemplate | None = None, template_options: dict | None = None,
                 num_judgments: int = 1, subset_size: int = 0, subset_rounds: int = 1, shuffle: bool = False,
                 use_reference: bool = False, tie_reward: float = 0.5, invalid_verdict: float = 0.5,
                 invalid_reward: float = 0.0, pairwise_reward: str = "score", pivot_reward: str = "self",
                 eval_num_judgments: int = 0, score_expectation: bool = False, guards: Any = True,
                 chat_template: bool = True, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"judge option mode must be one of {list(MODES)}, got {mode!r}")
        if pairwise_reward not in PAIRWISE_REWARDS:
            raise ValueError(f"judge option pairwise_reward must be one of {list(PAIRWISE_REWARDS)}, "
                             f"got {pairwise_reward!r}")
        if pivot_reward not in PIVOT_REWARDS:
            raise ValueError(f"judge option pivot_reward must be one of {list(PIVOT_REWARDS)}, got {pivot_reward!r}")
        if eval_num_judgments < 0:
            raise ValueError(f"judge option eval_num_judgments must be 0 (greedy) or >= 1, got {eval_num_judgments}")
        if num_judgments < 1:
            raise ValueError(f"judge option num_judgments must be >= 1, got {num_judgments}")
        if subset_size < 0 or subset_size == 1:
            raise ValueError(f"judge option subset_size must be 0 (all G) or >= 2, got {subset_size}")
        if subset_rounds < 1:
            raise ValueError(f"judge option subset_rounds must be >= 1, got {subset_rounds}")
        if isinstance(template, JudgeTemplate):
            tpl = template
        else:
            name_ = template or DEFAULT_TEMPLATES[mode]
            if use_reference and not name_.endswith("_ref"):
                name_ += "_ref"
            tpl = get_template(name_, **(template_options or {}))
        if tpl.format not in _MODE_FORMATS[mode]:
            raise ValueError(f"judge mode {mode!r} needs a template of format {list(_MODE_FORMATS[mode])}, "
                             f"got {tpl.name!r} ({tpl.format})")
        if score_expectation:
            if mode != "pointwise" or tpl.format != "pointwise":
                raise ValueError("judge option score_expectation needs mode pointwise with a <score> template, got "
                                 f"mode {mode!r} and template {tpl.name!r} ({tpl.format})")
            if not tpl.integer or tpl.max_score - tpl.min_score > 100:
                raise ValueError(f"judge option score_expectation needs integer scores (at most 101 values), got "
                                 f"template {tpl.name!r} with integer={tpl.integer}, range {tpl.min_score}-"
                                 f"{tpl.max_score}: set template_options.integer: true")
        self.score_expectation = bool(score_expectation)
        self.judge, self.tokenizer, self.name, self.mode, self.template = judge, tokenizer, name, mode, tpl
        self.k, self.subset_size, self.subset_rounds, self.shuffle = int(num_judgments), int(subset_size), int(subset_rounds), bool(shuffle)
        self.tie_reward, self.invalid_verdict, self.invalid_reward = float(tie_reward), float(invalid_verdict), float(invalid_reward)
        self.pairwise_reward, self.pivot_reward, self.eval_k = pairwise_reward, pivot_reward, int(eval_num_judgments)
        self.guards = guard_config(guards)
        self.chat_template, self.seed = chat_template, int(seed)
        self.counter = GuardCounter()
        self.total_calls = 0

    # ------------------------------------------------------------------ rendering
    def render(self, item, **fields) -> str:
        extra = {}
        if self.template.uses_reference:
            if item.reference is None:
                raise ValueError(f"judge template {self.template.name!r} shows a reference answer but item "
                                 f"{item.id!r} has none")
            extra["reference"] = item.reference
        tok = self.tokenizer if self.chat_template else None
        return self.template.render(tok, prompt=prompt_as_text(item.prompt), **fields, **extra)

    def _requests(self, rollouts: Rollouts, ok: np.ndarray, rng_seed: int) -> list[_Request]:
        b, g = rollouts.shape
        reqs: list[_Request] = []
        for i, item in enumerate(rollouts.items):
            resp = rollouts.completions[i]
            live = [j for j in range(g) if ok[i, j]]
            rng = np.random.default_rng([rng_seed, i])
            if self.mode == "pointwise":
                reqs += [_Request(i, (j,), self.render(item, response=resp[j])) for j in live]
            elif self.mode in ("pairwise", "pivot"):
                pairs: list[tuple[int, int, int | None]] = []  # (shown as A, shown as B, pivot slot)
                if self.mode == "pairwise":
                    pairs = [(a, c, None) for a in live for c in live if a != c]
                elif len(live) >= (1 if self.pivot_reward == "self" else 2):
                    p = live[int(rng.integers(len(live)))]
                    for x in live:  # fairseq2: every rollout, the pivot itself included, in both orders
                        if x != p or self.pivot_reward == "self":
                            pairs += [(x, p, 1), (p, x, 0)]
                if self.template.format.startswith("listwise"):  # a ranking judge shown two responses
                    reqs += [_Request(i, (a, c), self.render(item, responses=[resp[a], resp[c]]), slot)
                             for a, c, slot in pairs]
                else:
                    reqs += [_Request(i, (a, c), self.render(item, response_a=resp[a], response_b=resp[c]), slot)
                             for a, c, slot in pairs]
            else:
                if not live:
                    continue
                size = self.subset_size if 0 < self.subset_size < len(live) else len(live)
                rounds = self.subset_rounds if size < len(live) else 1
                for _ in range(rounds):
                    order = [int(x) for x in (rng.permutation(live) if (size < len(live) or self.shuffle) else live)]
                    chunks = [order[s:s + size] for s in range(0, len(order), size)]
                    if len(chunks) > 1 and len(chunks[-1]) == 1:  # never rank a response alone
                        last = chunks.pop()
                        chunks[-1] = chunks[-1] + last
                    for members in chunks:
                        reqs.append(_Request(i, tuple(members), self.render(item, responses=[resp[m] for m in members])))
        return reqs

    # ------------------------------------------------------------------ scoring
    def __call__(self, rollouts: Rollouts) -> tuple[np.ndarray, dict]:
        b, g = rollouts.shape
        ok = np.ones((b, g), bool)
        if self.guards is not None:
            for i, item in enumerate(rollouts.items):
                q = prompt_as_text(item.prompt)
                for j, text in enumerate(rollouts.completions[i]):
                    reason = check_text(text, q, self.guards)
                    if reason is not None:
                        ok[i, j] = False
                        self.counter.add(reason)
        seed = content_seed(self.seed, rollouts.prompt_texts, rollouts.completions)
        reqs = self._requests(rollouts, ok, seed)
        outputs = self.judge.generate([r.text for r in reqs], num_samples=self.k, seed=seed) if reqs else []
        self.total_calls += len(reqs)
        n_samples = len(reqs) * self.k
        results = [[self._parse(o, len(r.members)) for o in outs] for r, outs in zip(reqs, outputs)]
        invalid = sum(not res.valid for rs in results for res in rs)
        self.counter.update(res for rs in results for res in rs)

        metrics_extra: dict[str, float] = {}
        # per-rollout lists of reward entries
        entries: list[list[list[float]]] = [[[] for _ in range(g)] for _ in range(b)]
        valid_scores: list[float] = []
        bias_flips, bias_pairs = 0, 0
        if self.mode in ("pairwise", "pivot"):
            by_score = self.pairwise_reward == "score" and self.template.format != "pairwise"
            outcome: dict[tuple[int, int, int], list[float | None]] = {}
            for r, rs in zip(reqs, results):
                outs = [pairwise_outcome(res) for res in rs]
                outcome[(r.group, *r.members)] = outs
                # pivot_reward self: only the non-pivot slot earns (the pivot's own: its self-comparison)
                slots = (1 - r.pivot_slot,) if self.mode == "pivot" and self.pivot_reward == "self" else (0, 1)
                for res, o in zip(rs, outs):
                    for slot in slots:
                        if by_score:
                            if not res.valid:
                                continue
                            v = normalise(float(res.value[slot]), self.template)
                        elif o is None:
                            v = self.invalid_verdict
                        else:
                            v = self.tie_reward if o == 0.5 else (o if slot == 0 else 1.0 - o)
                        entries[r.group][r.members[slot]].append(v)
                        if by_score or o is not None:
                            valid_scores.append(v)
            for (grp, a, c), outs in outcome.items():
                if a < c and (grp, c, a) in outcome:
                    for o1, o2 in zip(outs, outcome[(grp, c, a)]):
                        if o1 is None or o2 is None or o1 == 0.5 or o2 == 0.5:
                            continue
                        bias_pairs += 1
                        bias_flips += int((o1 == 1.0) != (o2 == 0.0))  # a's win in (a, c) vs a's win in (c, a)
            # comparisons with a guarded rollout: the other side wins (no judge call)
            for i in range(b):
                for j in range(g):
                    if ok[i, j]:
                        continue
                    for x in range(g):
                        if x != j and ok[i, x] and self.mode == "pairwise":
                            entries[i][x] += [1.0, 1.0]
            rewards = np.full((b, g), self.invalid_reward if by_score else self.invalid_verdict, np.float32)
            for i in range(b):
                for j in range(g):
                    if entries[i][j]:
                        rewards[i, j] = float(np.mean(entries[i][j]))
        else:
            expected = self._expected_scores(reqs, outputs, results) if self.score_expectation else {}
            if expected:
                metrics_extra["expectation_gap"] = float(np.mean(
                    [abs(e - normalise(float(results[r][k].value), self.template)) for (r, k), e in expected.items()]))
            for n, (r, rs) in enumerate(zip(reqs, results)):
                for k, res in enumerate(rs):
                    if not res.valid:
                        continue
                    vals = (res.value,) if self.mode == "pointwise" else tuple(res.value)
                    for m, v in zip(r.members, vals):
                        s = expected.get((n, k), normalise(float(v), self.template))
                        entries[r.group][m].append(s)
                        valid_scores.append(s)
            rewards = np.full((b, g), self.invalid_reward, np.float32)
            for i in range(b):
                for j in range(g):
                    if entries[i][j]:
                        rewards[i, j] = float(np.mean(entries[i][j]))
        rewards[~ok] = 0.0  # guarded rollouts earn nothing, whatever the judge would say
        metrics = {
            "judge_calls": float(len(reqs)),
            "judge_samples": float(n_samples),
            "calls_per_group": len(reqs) / max(b, 1),
            "invalid_rate": invalid / max(n_samples, 1),
            "mean_score": float(np.mean(valid_scores)) if valid_scores else 0.0,
            "guarded_rate": float((~ok).mean()) if ok.size else 0.0,
        }
        if self.mode in ("pairwise", "pivot"):
            metrics["position_bias_rate"] = bias_flips / bias_pairs if bias_pairs else 0.0
            metrics["position_pairs"] = float(bias_pairs)
        metrics.update(metrics_extra)
        return rewards, metrics

    def _expected_scores(self, reqs, outputs, results) -> dict[tuple[int, int], float]:
        """`score_expectation`: for each valid judgment (request n, sample k), the judge's expected
        normalised score at its verdict, Σ_s P(s) norm(s) over the template's integer scores s,
        P ∝ P(s + closing | judge prompt + its judgment up to the score) (`closing`: what the judge
        wrote after its number, e.g. `</score>`), in place of the one decoded score: a judge 60 % sure
        of "1" pays 0.6, not 1 or 0. One teacher-forced pass (`TextJudge.continuation_logprobs`)."""
        lo, hi = int(self.template.min_score), int(self.template.max_score)
        keys, prefixes, closings, prompt_chars = [], [], [], []
        for n, (r, outs, rs) in enumerate(zip(reqs, outputs, results)):
            for k, (text, res) in enumerate(zip(outs, rs)):
                if not res.valid or res.span is None:
                    continue
                tag = _SCORE_VALUE_RE.match(text, res.span[0], res.span[1])
                if tag is None:
                    continue
                keys.append((n, k))
                prefixes.append(r.text + text[:tag.start(1)])
                prompt_chars.append(len(r.text))
                closings.append(text[tag.end(1):res.span[1]])
        out: dict[tuple[int, int], float] = {}
        norm = np.asarray([normalise(float(v), self.template) for v in range(lo, hi + 1)])
        for closing in dict.fromkeys(closings):  # one candidate set per distinct closing (almost always one)
            rows = [i for i, c in enumerate(closings) if c == closing]
            logp = self.judge.continuation_logprobs([prefixes[i] for i in rows],
                                                    [f"{v}{closing}" for v in range(lo, hi + 1)],
                                                    prompt_chars=[prompt_chars[i] for i in rows])
            p = np.exp(logp - logp.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            for i, e in zip(rows, p @ norm):
                out[keys[i]] = float(e)
        return out

    def for_eval(self) -> "JudgeSource":
        """This source as evaluation uses it (``eval_reward/<task>``, ``win_rate/<task>``): the same
        judge model, template and guards, judging greedily (``eval_num_judgments: 0``) or with the
        mean of ``eval_num_judgments`` samples; its own guard counts (the run's ``reward_guard``
        counts training only)."""
        view = copy.copy(self)
        view.counter, view.total_calls, view.judge = GuardCounter(), 0, copy.copy(self.judge)
        if self.eval_k == 0:
            view.k, view.judge.greedy = 1, True
        else:
            view.k = self.eval_k
        return view

    def _parse(self, text: str, n: int) -> ParseResult:
        return self.template.parse(text, n if self.template.format.startswith("listwise") else None)

    def guard_report(self) -> dict[str, int]:
        return self.counter.report()


# ============================================================================ J1 score-match source


class ScoreMatchSource:
    """J1 judge-training reward for ``kind: judgment`` tasks (see module docstring).

    The template is ``options.template``, else the task's ``options.template`` with its
    ``options.template_options`` (looked up by ``item.task`` in ``tasks``), else
    ``pointwise_correctness``. Only pointwise formats.
    """

    def __init__(self, *, name: str = "score_match", template: str | None = None, tolerance: float = 0.0,
                 invalid_reward: float = 0.0, truncated_reward: float | None = None, tasks: dict | None = None):
        self.name, self.template_name, self.tolerance = name, template, float(tolerance)
        self.invalid_reward, self.tasks = float(invalid_reward), tasks or {}
        self.truncated_reward = None if truncated_reward is None else float(truncated_reward)
        self.counter = GuardCounter()
        self._templates: dict[str, JudgeTemplate] = {}

    def template_for(self, task: str) -> JudgeTemplate:
        if task not in self._templates:
            spec = self.tasks.get(task)
            if self.template_name or spec is None:
                tpl = get_template(self.template_name or "pointwise_correctness")
            else:
                tpl = task_template(spec, "pointwise_correctness")
            name = tpl.name
            if tpl.format != "pointwise":
                raise ValueError(f"score_match: template {name!r} has format {tpl.format!r}; only pointwise "
                                 "judgments (a <score> per response) can be matched against a label")
            self._templates[task] = tpl
        return self._templates[task]

    def __call__(self, rollouts: Rollouts) -> tuple[np.ndarray, dict]:
        b, g = rollouts.shape
        rewards = np.zeros((b, g), np.float32)
        invalid, predicted = 0, []
        for i, item in enumerate(rollouts.items):
            if item.label is None:
                raise ValueError(f"score_match reward needs a teacher label; item {item.id!r} of task "
                                 f"{item.task!r} has none (task kind 'judgment' with a 'label' field)")
            tpl = self.template_for(item.task)
            target = label_score(item.label, tpl)
            results = [tpl.parse(text) for text in rollouts.completions[i]]
            invalid += sum(not r.valid for r in results)
            predicted += [float(r.value) for r in results if r.valid]
            rewards[i] = score_match_reward(results, [target] * g, tolerance=self.tolerance,
                                            invalid_reward=self.invalid_reward, counter=self.counter)
        metrics = {"accuracy": float((rewards >= 1.0).mean()) if rewards.size else 0.0,
                   "invalid_rate": invalid / max(b * g, 1),
                   "mean_score": float(np.mean(predicted)) if predicted else 0.0}
        if self.truncated_reward is not None:
            cut = np.asarray(rollouts.truncated, bool).reshape(b, g)
            rewards = np.where(cut, np.float32(self.truncated_reward), rewards).astype(np.float32)
            metrics["truncated_rate"] = float(cut.mean())
        return rewards, metrics

    def guard_report(self) -> dict[str, int]:
        return self.counter.report()


# ============================================================================ factories


_JUDGE_KEYS = ("name", "mode", "template", "template_options", "num_judgments", "subset_size", "subset_rounds",
               "shuffle", "use_reference", "tie_reward", "invalid_verdict", "invalid_reward", "pairwise_reward",
               "pivot_reward", "eval_num_judgments", "score_expectation", "guards", "chat_template", "seed")
_GEN_KEYS = ("max_prompt_length", "max_new_tokens", "temperature", "top_p", "top_k", "greedy", "batch_size",
             "rollout_engine", "max_prefix_len")


def _split_options(kind: str, options: dict) -> tuple[dict, dict]:
    unknown = sorted(set(options) - set(_JUDGE_KEYS) - set(_GEN_KEYS))
    if unknown:
        raise ValueError(f"reward type {kind}: unknown option(s) {unknown}; valid: {sorted(_JUDGE_KEYS + _GEN_KEYS)}")
    return ({k: v for k, v in options.items() if k in _JUDGE_KEYS},
            {k: v for k, v in options.items() if k in _GEN_KEYS})


def make_judge_source(spec, ctx: dict) -> JudgeSource:
    """``type: judge`` — a separate judge model loaded from ``spec.path``."""
    from jaxrl_rm.models.factory import load_frozen
    from jaxrl_rm.data.tokenizer import load_tokenizer

    if not spec.path:
        raise ValueError("reward type judge: set `path` to an HF judge-model directory (weights + tokenizer)")
    options = dict(spec.options)
    refresh = options.pop("refresh", None)  # online refresh: the GRPO trainer acts on it (train.refresh)
    opts, gen = _split_options("judge", options)
    # in the run's dtypes and layout, sharded like the policy (what `--plan` assumes)
    grpo = ctx.get("grpo")
    model = load_frozen(spec.path, grpo.cfg.model if grpo is not None else None, mesh=ctx.get("mesh"))
    tokenizer = load_tokenizer(spec.path)
    opts.setdefault("seed", ctx.get("seed", 0))
    if grpo is not None:  # the judge samples with the run's engine unless its options say otherwise
        gen.setdefault("rollout_engine", grpo.cfg.grpo.rollout_engine)
    judge = TextJudge(lambda: model, tokenizer, mesh=ctx.get("mesh"), **gen)
    source = JudgeSource(judge, tokenizer, **{"name": "judge", **opts})
    source.refresh_options = refresh
    return source


def make_self_judge_source(spec, ctx: dict) -> JudgeSource:
    """``type: self_judge`` — the live GRPO policy (``ctx["grpo"]``) judges its own rollouts (URPO)."""
    from flax import nnx

    grpo = ctx.get("grpo")
    if grpo is None:
        raise ValueError("reward type self_judge needs the GRPO trainer in the source context (ctx['grpo'])")
    opts, gen = _split_options("self_judge", dict(spec.options))
    opts.setdefault("mode", "listwise")
    opts.setdefault("seed", ctx.get("seed", 0))
    opts.setdefault("chat_template", grpo.cfg.data.chat_template)

    def model_fn():
        return nnx.merge(grpo.trainer.graphdef, grpo.current_params)

    gen.setdefault("rollout_engine", grpo.cfg.grpo.rollout_engine)
    judge = TextJudge(model_fn, grpo.tokenizer, mesh=ctx.get("mesh"), **gen)
    return JudgeSource(judge, grpo.tokenizer, **{"name": "self_judge", **opts})


def make_score_match_source(spec, ctx: dict) -> ScoreMatchSource:
    """``type: score_match`` — J1 reward for ``kind: judgment`` tasks."""
    opts = dict(spec.options)
    valid = ("name", "template", "tolerance", "invalid_reward", "truncated_reward")
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"reward type score_match: unknown option(s) {unknown}; valid: {list(valid)}")
    grpo = ctx.get("grpo")
    tasks = dict(getattr(grpo, "tasks", {}) or {})
    return ScoreMatchSource(tasks=tasks, **opts)


register("judge", make_judge_source)
register("self_judge", make_self_judge_source)
register("score_match", make_score_match_source)

__all__ = ["MODES", "JudgeSource", "ScoreMatchSource", "TextJudge", "content_seed", "label_score",
           "normalise", "pairwise_outcome", "prompt_as_text"]

"""Scalar reward models at inference: input builders, batched jitted scoring, RL reward sources.

Two input layouts, both read by `jaxrl_rm.models.reward.RewardModel`'s linear head:

Bradley–Terry (BT): `render(prompt) + response [+ eos]`; the head reads the last real token.

POLAR (Dou et al. 2025, Sec. 4.1): `prompt + reference <|split|> prompt + candidate <|reward|>`
    ids = P  R  [split]  P  C  [reward]        P = rendered prompt, R / C = response ids (+ eos)
the head reads the `<|reward|>` token. P + R and P + C are the ids of `render(prompt) + response`
encoded as one text (`jaxrl_rm.data.pipeline.encode_pieces`: with a byte-level BPE a token can
merge across the boundary; it then belongs to R / C, and P is the part both copies share).
Over-long inputs are cut to `max_length` keeping the *tail* of the prompt (the part next to the
answer) and the *head* of each response:
    room = max_length - 2 (the two special tokens)
    1. if 2|P| + |R| + |C| <= room nothing is cut;
    2. the responses share `room - 2 * min(|P|, min_prompt_tokens)` tokens: each keeps its head,
       a short response keeps all of itself and leaves the rest to the other (water-filling);
    3. the prompt keeps its last `min(|P|, (room - |R'| - |C'|) // 2)` tokens (in both copies).

Public API:
    PolarInputBuilder(tokenizer, max_length).build(prompt, reference, candidate) -> (ids, reward_index)
    BTInputBuilder(tokenizer, max_length).build(prompt, response) -> (ids, score_index)
    pad_sequences(seqs, length=..., pad_id=..., padding_side=...) -> batch dict
    PolarScorer(model, tokenizer, max_length).score(prompts, references, candidates) -> float32 [n]
    BTScorer(model, tokenizer, max_length).score(prompts, responses) -> float32 [n]
    (both: `.from_pretrained(hf_dir)`; batched in fixed-size row blocks, lengths bucketed, jitted)
Reward sources `bt_rm` and `polar_rm` (for `grpo.tasks[].rewards`) register on import.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.data.pipeline import encode, encode_pieces, length_bucket, render_prompt, tokenize_prompt_response

SPLIT_TOKEN = "<|split|>"
REWARD_TOKEN = "<|reward|>"
POLAR_SPECIAL_TOKENS = (SPLIT_TOKEN, REWARD_TOKEN)

Sequence_ = tuple[np.ndarray, int]  # (ids [L] int32, index of the token the head reads)


def share_budget(r: int, c: int, budget: int) -> tuple[int, int]:
    """Lengths (r', c') <= (r, c) with r' + c' <= max(budget, 0): water-filling, so a response
    shorter than half the budget keeps all of itself and the other gets the rest."""
    budget = max(int(budget), 0)
    if r + c <= budget:
        return r, c
    half = budget // 2
    if r <= half:
        return r, budget - r
    if c <= budget - half:
        return budget - c, c
    return half, budget - half


class PolarInputBuilder:
    """Token layout of a POLAR RM input (see module docstring).

    tokenizer: an HF tokenizer that already has `<|split|>` and `<|reward|>` (see
      `jaxrl_rm.models.resize.add_tokens_and_resize`).
    max_length: total tokens per input (>= 8).
    chat_template: render prompts through the tokenizer's chat template (when it has one).
    append_eos: end each response with the tokenizer's eos (a cut response loses it: the RM can
      tell a finished answer from a truncated one).
    min_prompt_tokens: prompt tokens kept (per copy) even when the responses are long;
      default max_length // 8.
    """

    def __init__(self, tokenizer, max_length: int, *, chat_template: bool = True, append_eos: bool = True,
                 min_prompt_tokens: int | None = None, split_token: str = SPLIT_TOKEN,
                 reward_token: str = REWARD_TOKEN):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in (split_token, reward_token) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer has no {missing}: add them with "
                             "jaxrl_rm.models.resize.add_tokens_and_resize(model, tokenizer, POLAR_SPECIAL_TOKENS)")
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.chat_template, self.append_eos = chat_template, append_eos
        self.min_prompt_tokens = max_length // 8 if min_prompt_tokens is None or min_prompt_tokens < 0 \
            else int(min_prompt_tokens)
        self.split_id, self.reward_id = vocab[split_token], vocab[reward_token]
        self.eos_id = tokenizer.eos_token_id if append_eos else None

    def prompt_text(self, prompt) -> str:
        return render_prompt(prompt, self.tokenizer, chat_template=self.chat_template)

    def pieces(self, prompt_text: str, reference: str, candidate: str,
               prompt_ids: Sequence[int] | None = None) -> tuple[list[int], list[int], list[int]]:
        """(P, R, C) ids: `prompt_text + reference` and `prompt_text + candidate` each encoded as one
        text, split where they part (`encode_pieces`); R and C end with eos when `append_eos`."""
        head, (ref, cand) = encode_pieces(self.tokenizer, prompt_text, [reference, candidate], prefix_ids=prompt_ids)
        eos = [self.eos_id] if self.eos_id is not None else []
        return head, ref + eos, cand + eos

    def build_ids(self, prompt_ids: Sequence[int], ref_ids: Sequence[int], cand_ids: Sequence[int]) -> Sequence_:
        """Token-level layout + truncation -> (ids `[L]` int32, L <= max_length; index of <|reward|> = L-1)."""
        room = self.max_length - 2
        p, r, c = len(prompt_ids), len(ref_ids), len(cand_ids)
        if 2 * p + r + c > room:
            keep_p = min(p, self.min_prompt_tokens)
            r, c = share_budget(r, c, room - 2 * keep_p)
            p = min(p, (room - r - c) // 2)
        prompt = list(prompt_ids)[len(prompt_ids) - p:]
        ids = prompt + list(ref_ids)[:r] + [self.split_id] + prompt + list(cand_ids)[:c] + [self.reward_id]
        return np.asarray(ids, np.int32), len(ids) - 1

    def build(self, prompt, reference: str, candidate: str) -> Sequence_:
        return self.build_ids(*self.pieces(self.prompt_text(prompt), reference, candidate))

    def build_many(self, prompts: Sequence, references: Sequence[str], candidates: Sequence[str]) -> list[Sequence_]:
        """Batch form; a prompt repeated across rows is rendered and encoded alone once."""
        if not (len(prompts) == len(references) == len(candidates)):
            raise ValueError(f"prompts ({len(prompts)}), references ({len(references)}) and candidates "
                             f"({len(candidates)}) must have the same length")
        cache: dict = {}
        out = []
        for p, r, c in zip(prompts, references, candidates):
            key = p if isinstance(p, str) else repr(p)
            if key not in cache:
                text = self.prompt_text(p)
                cache[key] = (text, encode(self.tokenizer, text))
            text, ids = cache[key]
            out.append(self.build_ids(*self.pieces(text, r, c, prompt_ids=ids)))
        return out


class BTInputBuilder:
    """`render(prompt) + response [+ eos]`, cut to `max_length` (response head, prompt tail, as
    `tokenize_prompt_response`); the head reads the last token. Prompt and response are encoded
    as one text (`jaxrl_rm.data.pipeline.encode_pieces`), so the ids are those of the chat text."""

    def __init__(self, tokenizer, max_length: int, *, chat_template: bool = True, append_eos: bool = True):
        self.tokenizer, self.max_length, self.chat_template = tokenizer, int(max_length), chat_template
        self.eos_id = tokenizer.eos_token_id if append_eos else None

    def prompt_text(self, prompt) -> str:
        return render_prompt(prompt, self.tokenizer, chat_template=self.chat_template)

    def build_ids(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Sequence_:
        ids, _ = tokenize_prompt_response(prompt_ids, response_ids, self.max_length, self.eos_id)
        return ids, len(ids) - 1

    def build_text(self, prompt_text: str, response: str, prompt_ids: Sequence[int] | None = None) -> Sequence_:
        head, (tail,) = encode_pieces(self.tokenizer, prompt_text, [response], prefix_ids=prompt_ids)
        return self.build_ids(head, tail)

    def build(self, prompt, response: str) -> Sequence_:
        return self.build_text(self.prompt_text(prompt), response)

    def build_many(self, prompts: Sequence, responses: Sequence[str]) -> list[Sequence_]:
        if len(prompts) != len(responses):
            raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in length")
        cache: dict = {}
        out = []
        for p, r in zip(prompts, responses):
            key = p if isinstance(p, str) else repr(p)
            if key not in cache:
                text = self.prompt_text(p)
                cache[key] = (text, encode(self.tokenizer, text))
            text, ids = cache[key]
            out.append(self.build_text(text, r, prompt_ids=ids))
        return out


def pad_sequences(seqs: Sequence[Sequence_], *, length: int, pad_id: int, padding_side: str = "right") -> dict:
    """[(ids, index)] -> input_ids `[N, length]` int32, attention_mask `[N, length]` bool,
    score_index `[N]` int32 (the head token's position after padding)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n = len(seqs)
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), bool)
    index = np.zeros((n,), np.int32)
    for i, (x, j) in enumerate(seqs):
        if len(x) > length:
            raise ValueError(f"sequence {i} has {len(x)} tokens > length {length}")
        off = 0 if padding_side == "right" else length - len(x)
        ids[i, off: off + len(x)], mask[i, off: off + len(x)], index[i] = x, True, off + j
    return {"input_ids": ids, "attention_mask": mask, "score_index": index}


def _batch_multiple(mesh) -> int:
    if mesh is None:
        return 1
    from jaxrl_rm.parallel.rules import batch_shards

    return batch_shards(mesh)


class RewardScorer:
    """Batched, jitted scoring of prepared sequences with a `RewardModel`.

    Rows are scored in blocks of `batch_size` (the last block padded with dummy rows), each block
    padded to a power-of-two length <= max_length, so a stream of calls compiles a handful of
    shapes. `params` (a pure dict, e.g. a train state's) can replace the model's weights per call.
    """

    def __init__(self, model, tokenizer, *, max_length: int, batch_size: int = 32, mesh=None,
                 padding_side: str = "right", keep_params: bool = True):
        """keep_params=False: hold only the graph; every call must pass `params=` (e.g. a trainer
        scoring with its train state, without a second copy of the weights)."""
        self.tokenizer, self.max_length, self.mesh = tokenizer, int(max_length), mesh
        mult = int(np.lcm(_batch_multiple(mesh), jax.process_count()))
        self.batch_size = -(-int(batch_size) // mult) * mult
        self.padding_side = padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        graphdef, state = nnx.split(model)
        self.graphdef, self.params = graphdef, (nnx.to_pure_dict(state) if keep_params else None)
        if mesh is not None and keep_params:  # weights sharded by the rules table, like the batches
            from jaxrl_rm.parallel.rules import param_shardings

            self.params = jax.device_put(self.params, param_shardings(self.params, mesh))

        def forward(params, input_ids, attention_mask, score_index):
            m = nnx.merge(graphdef, params)
            return m(input_ids, attention_mask, score_index=score_index).astype(jnp.float32)

        self._forward = jax.jit(forward)

    def score_sequences(self, seqs: Sequence[Sequence_], *, params=None) -> np.ndarray:
        """[(ids, head index)] -> rewards `[n]` float32 (input order)."""
        params = self.params if params is None else params
        if params is None:
            raise ValueError("this scorer keeps no weights (keep_params=False): pass params=")
        out = np.zeros((len(seqs),), np.float32)
        for start in range(0, len(seqs), self.batch_size):
            block = list(seqs[start: start + self.batch_size])
            n = len(block)
            block += [block[0]] * (self.batch_size - n)
            length = length_bucket(max(len(x) for x, _ in block), self.max_length)
            batch = pad_sequences(block, length=length, pad_id=self.pad_id, padding_side=self.padding_side)
            procs = jax.process_count()
            if self.mesh is not None:
                from jaxrl_rm.parallel.rules import shard_batch

                if procs > 1:  # every process holds the whole block; each contributes its rows
                    rows = self.batch_size // procs
                    p = jax.process_index()
                    batch = {k: v[p * rows:(p + 1) * rows] for k, v in batch.items()}
                batch = shard_batch(batch, self.mesh)
            r = self._forward(params, batch["input_ids"], batch["attention_mask"], batch["score_index"])
            if procs > 1 and not r.is_fully_addressable:
                from jax.experimental import multihost_utils

                r = multihost_utils.process_allgather(r, tiled=True)
            out[start: start + n] = np.asarray(jax.device_get(r))[:n]
        return out


class PolarScorer(RewardScorer):
    """`score(prompts, references, candidates)` -> r(p, ref, cand) float32 `[n]` with a POLAR RM."""

    def __init__(self, model, tokenizer, max_length: int = 1024, *, batch_size: int = 32, chat_template: bool = True,
                 append_eos: bool = True, min_prompt_tokens: int | None = None, mesh=None,
                 padding_side: str = "right"):
        super().__init__(model, tokenizer, max_length=max_length, batch_size=batch_size, mesh=mesh,
                         padding_side=padding_side)
        self.builder = PolarInputBuilder(tokenizer, max_length, chat_template=chat_template, append_eos=append_eos,
                                         min_prompt_tokens=min_prompt_tokens)

    @classmethod
    def from_pretrained(cls, path, *, spec=None, **kwargs) -> "PolarScorer":
        """From an HF directory holding a `*ForSequenceClassification` RM and its tokenizer
        (`spec`: load in a run's dtypes and layer layout)."""
        model, tokenizer = _load_rm(path, spec)
        return cls(model, tokenizer, **kwargs)

    def score(self, prompts: Sequence, references: Sequence[str], candidates: Sequence[str], *,
              params=None) -> np.ndarray:
        """prompts (str or chat messages), references, candidates: equal-length lists -> `[n]` float32."""
        return self.score_sequences(self.builder.build_many(prompts, references, candidates), params=params)


class BTScorer(RewardScorer):
    """`score(prompts, responses)` -> r(p, response) float32 `[n]` with a Bradley–Terry RM."""

    def __init__(self, model, tokenizer, max_length: int = 1024, *, batch_size: int = 32, chat_template: bool = True,
                 append_eos: bool = True, mesh=None, padding_side: str = "right"):
        super().__init__(model, tokenizer, max_length=max_length, batch_size=batch_size, mesh=mesh,
                         padding_side=padding_side)
        self.builder = BTInputBuilder(tokenizer, max_length, chat_template=chat_template, append_eos=append_eos)

    @classmethod
    def from_pretrained(cls, path, *, spec=None, **kwargs) -> "BTScorer":
        """As `PolarScorer.from_pretrained`."""
        model, tokenizer = _load_rm(path, spec)
        return cls(model, tokenizer, **kwargs)

    def score(self, prompts: Sequence, responses: Sequence[str], *, params=None) -> np.ndarray:
        return self.score_sequences(self.builder.build_many(prompts, responses), params=params)


def _load_rm(path, spec=None):
    """RM and tokenizer from an HF directory; with `spec` (a run's `ModelSpec`) in its compute /
    storage dtypes and layer layout, as `--plan` assumes (a 7B RM beside a bf16 policy is not a
    float32 copy)."""
    from jaxrl_rm.data.tokenizer import load_tokenizer
    from jaxrl_rm.models.factory import load_frozen
    from jaxrl_rm.models.reward import RewardModel

    model = load_frozen(path, spec)
    if not isinstance(model, RewardModel):
        raise ValueError(f"{path}: not a reward model (expected a *ForSequenceClassification checkpoint)")
    return model, load_tokenizer(path)


# --- reward sources for RL (grpo.tasks[].rewards: type bt_rm | polar_rm) -------------------------
class ScalarRMSource:
    """Base of the `bt_rm` / `polar_rm` reward sources. `refresh_options`: the reward's
    `options.refresh` (None: a frozen RM); the GRPO trainer then attaches a refresher
    (`train.refresh.RMRefresher`) and sets `params_fn`, which returns the weights to score with."""

    def __init__(self, scorer, *, name: str, normalize: bool = False, refresh_options: dict | None = None):
        self.scorer, self.name, self.normalize = scorer, name, normalize
        self.refresh_options = refresh_options
        self.params_fn = None

    def params(self):
        return None if self.params_fn is None else self.params_fn()

    def _finish(self, r: np.ndarray, b: int, g: int):
        r = r.reshape(b, g).astype(np.float32)
        metrics = {"raw_mean": float(r.mean()), "raw_std": float(r.std())}
        if self.normalize:  # per-prompt centring is left to the advantage; this only rescales
            r = (r - r.mean()) / (r.std() + 1e-6)
        return r, metrics


class BTRewardSource(ScalarRMSource):
    """Rewards `[B, G]` = BT RM score of each completion given its prompt."""

    def __call__(self, rollouts):
        b, g = rollouts.shape
        prompts = [item.prompt for item in rollouts.items for _ in range(g)]
        responses = [c for row in rollouts.completions for c in row]
        return self._finish(self.scorer.score(prompts, responses, params=self.params()), b, g)


class PolarRewardSource(ScalarRMSource):
    """Rewards `[B, G]` = r(prompt, item.reference, completion) from a POLAR RM (RFT)."""

    def __call__(self, rollouts):
        b, g = rollouts.shape
        missing = [i for i, item in enumerate(rollouts.items) if item.reference is None]
        if missing:
            raise ValueError(f"polar_rm reward needs a reference per prompt; items {missing[:5]} have none "
                             "(task kind 'open' with a 'reference' field)")
        prompts = [item.prompt for item in rollouts.items for _ in range(g)]
        refs = [item.reference for item in rollouts.items for _ in range(g)]
        cands = [c for row in rollouts.completions for c in row]
        return self._finish(self.scorer.score(prompts, refs, cands, params=self.params()), b, g)


def _source_factory(kind: str):
    def make(spec, ctx: dict) -> Any:
        if not spec.path:
            raise ValueError(f"reward type {kind}: set `path` to an HF reward-model directory")
        opts = dict(spec.options)
        name = opts.pop("name", kind)
        normalize = bool(opts.pop("normalize", False))
        refresh = opts.pop("refresh", None)  # online refresh: the GRPO trainer acts on it (train.refresh)
        opts.setdefault("mesh", ctx.get("mesh"))
        cls = PolarScorer if kind == "polar_rm" else BTScorer
        grpo = ctx.get("grpo")  # in the run's dtypes and layout, placed on its mesh by the scorer
        scorer = cls.from_pretrained(spec.path, spec=grpo.cfg.model if grpo is not None else None, **opts)
        src = PolarRewardSource if kind == "polar_rm" else BTRewardSource
        return src(scorer, name=name, normalize=normalize, refresh_options=refresh)

    return make


def _register() -> None:
    try:
        from jaxrl_rm.rewards.sources import register
    except ImportError:  # sources module not present: scoring still works standalone
        return
    register("bt_rm", _source_factory("bt_rm"))
    register("polar_rm", _source_factory("polar_rm"))


_register()

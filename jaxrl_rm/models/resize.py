"""Vocabulary growth for new special tokens, and turning a causal LM into a reward model.

POLAR adds two special tokens (`<|split|>`, `<|reward|>`) to an existing tokenizer; the model's
embedding table (and an untied `lm_head`, if the model has one) must grow to the new vocabulary.

New rows are initialised to the **mean of the existing rows** (over the ids the tokenizer
already used), not randomly: a random row at the init scale has a norm unlike any trained
embedding, so the first forward passes push hidden states off the distribution the pretrained
backbone knows and the first BT gradients are dominated by that shock. The mean row is
in-distribution, gives the new token an average "meaning" (so an LM head's logits for it start at
the average logit rather than an arbitrary one), and is deterministic. See Hewitt (2021),
"Initializing new word embeddings for pretrained language models". When the model's table is
already larger than the tokenizer (vocabularies padded to a multiple of 64/128), the new tokens
take unused rows, which are reset to the mean too.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.models.reward import RewardModel
from jaxrl_rm.models.transformer import Transformer


def add_special_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Register `tokens` as special tokens of `tokenizer` (in place; existing ones are kept).

    Returns the ids of `tokens` (whether they were new or already present). Special tokens are
    never split by the tokenizer and are skipped by `decode(..., skip_special_tokens=True)`.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": list(missing)}, replace_extra_special_tokens=False)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def _backbone(model) -> Transformer:
    return model.backbone if isinstance(model, RewardModel) else model


def resize_vocab(model, new_vocab_size: int, *, init_rows: Sequence[int] = (), mean_over: int | None = None):
    """Grow (or keep) the vocabulary of a `Transformer` or `RewardModel` in place; returns `model`.

    new_vocab_size: rows of the new embedding `[V', D]` (never shrinks: V' = max(V, new_vocab_size)).
    init_rows: ids whose rows are (re)initialised besides the appended ones, e.g. new special
      tokens that landed in unused padding rows of an oversized table.
    mean_over: the new rows get the mean of rows `[0, mean_over)` (default: the old V). Pass the
      tokenizer's old length so unused padding rows do not enter the mean.
    An untied `lm_head` `[D, V]` grows the same way (new columns = mean column), so an LM keeps
    giving the new tokens an average logit. `config.vocab_size` is updated.
    """
    bb = _backbone(model)
    old = bb.config.vocab_size
    new = max(int(new_vocab_size), old)
    rows = sorted({int(r) for r in init_rows if 0 <= int(r) < old})
    if new == old and not rows:
        return model
    n_mean = old if mean_over is None else max(1, min(int(mean_over), old))

    def grow(table: jnp.ndarray, axis: int) -> jnp.ndarray:
        t = np.asarray(table, np.float32)
        t = np.moveaxis(t, axis, 0)
        mean = t[:n_mean].mean(axis=0, keepdims=True)
        out = np.concatenate([t, np.repeat(mean, new - old, axis=0)], axis=0) if new > old else t.copy()
        out[rows] = mean
        return jnp.asarray(np.moveaxis(out, 0, axis), dtype=table.dtype)

    bb.embed = nnx.Param(grow(bb.embed[...], 0))
    if bb.lm_head is not None:
        bb.lm_head.kernel = nnx.Param(grow(bb.lm_head.kernel[...], 1))
    bb.config = dataclasses.replace(bb.config, vocab_size=new)
    return model


def add_tokens_and_resize(model, tokenizer, tokens: Sequence[str]) -> list[int]:
    """`add_special_tokens` + `resize_vocab` for the tokens that are new to the tokenizer.

    Returns the ids of `tokens`. The model is changed in place (rows of new tokens = mean row).
    """
    before = len(tokenizer)
    known = tokenizer.get_vocab()
    fresh = [t for t in tokens if t not in known]
    ids = add_special_tokens(tokenizer, tokens)
    fresh_ids = [i for t, i in zip(tokens, ids) if t in fresh]
    if fresh_ids or len(tokenizer) > _backbone(model).config.vocab_size:
        resize_vocab(model, len(tokenizer), init_rows=fresh_ids, mean_over=before)
    return ids


def reward_model_from_lm(lm: Transformer, *, seed: int = 0) -> RewardModel:
    """A `RewardModel` whose backbone is `lm` without its untied `lm_head` (dropped: an RM never
    produces logits, and carrying `[D, V]` unused weights through optimizer and checkpoints
    costs memory). The scalar head is freshly initialised (small, so initial rewards are ~0)."""
    if isinstance(lm, RewardModel):
        return lm
    lm.lm_head = None
    return RewardModel(lm.config, backbone=lm, dtype=lm.dtype, param_dtype=lm.embed[...].dtype,
                       rngs=nnx.Rngs(seed))

"""Scalar reward model: a decoder backbone plus a linear head on one token's hidden state.

Used by Bradley–Terry RMs (head on the last non-pad token) and POLAR RMs (head on the `<reward>`
token, which the POLAR input builder places last). The head has no bias: a constant offset cancels
in every pairwise loss, and bias-free matches HF's `*ForSequenceClassification` `score` layer, so
exported RMs load in `transformers`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.transformer import Transformer


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """attention_mask `[B, T]` -> index `[B]` int32 of the last real token (left or right padding)."""
    t = attention_mask.shape[1]
    positions = jnp.where(attention_mask.astype(bool), jnp.arange(t)[None, :], -1)
    return jnp.maximum(positions.max(axis=1), 0).astype(jnp.int32)


class RewardModel(nnx.Module):
    """`rm(input_ids, attention_mask)` -> rewards `[B]` float32."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, backbone: Transformer | None = None,
                 scan_layers: bool = False, remat: str = "none"):
        """backbone: an existing `Transformer` (its layout is kept); else a fresh one with
        `scan_layers` / `remat` (see `Transformer`)."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.backbone = backbone or Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                                with_lm_head=False, scan_layers=scan_layers, remat=remat)
        # Small init keeps initial rewards near 0 (a neutral BT start).
        std = 1.0 / (config.hidden_size ** 0.5) * 0.1
        self.score = nnx.Param(std * jax.random.normal(rngs.params(), (config.hidden_size,), param_dtype))

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def __call__(self, input_ids, attention_mask=None, *, score_index=None):
        """input_ids `[B, T]`, attention_mask `[B, T]`; score_index `[B]` overrides which token
        the head reads (default: the last real token). -> rewards `[B]` float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
        if score_index is None:
            score_index = last_token_index(attention_mask)
        h = jnp.take_along_axis(hidden, score_index[:, None, None], axis=1)[:, 0]
        return jnp.dot(h.astype(jnp.float32), self.score[...].astype(jnp.float32))

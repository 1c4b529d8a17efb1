"""Model hyper-parameters for the Llama-3 / Qwen2 / Qwen3 decoder family."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

#: HF `model_type` values this library can load, and what distinguishes them.
SUPPORTED_ARCHITECTURES = {
    "llama": dict(attention_bias=False, qk_norm=False),
    "qwen2": dict(attention_bias=True, qk_norm=False),
    "qwen3": dict(attention_bias=False, qk_norm=True),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: Any) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' | a jnp dtype -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (names follow HF `config.json`).

    `rope_scaling` is None or a dict with `rope_type` in {"default", "linear", "llama3"} and that
    type's parameters (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`).
    """

    model_type: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling.rope_type {rope_type!r}; supported: default, linear, llama3")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def for_family(cls, model_type: str, **kwargs) -> "ModelConfig":
        """A config with the family's defining switches (bias, q/k norm) filled in."""
        return cls(model_type=model_type, **{**SUPPORTED_ARCHITECTURES[model_type], **kwargs})

    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        q, kv = self.num_attention_heads * h, self.num_key_value_heads * h
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * h if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * layer + d + head

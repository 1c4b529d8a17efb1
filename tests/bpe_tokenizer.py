"""A small byte-level BPE tokenizer trained in-process, shaped like the real ones (Qwen2 / Llama-3).

The character tokenizer that the rest of the suite uses has encode(a + b) == encode(a) + encode(b);
real tokenizers do not: a byte-level BPE pre-splits text with a regex that crosses piece
boundaries ("\\n" + "\\n" is one pre-token, ":" + "\\n" is one) and merges bytes inside each
pre-token. This one has what matters for the library's text <-> ids paths:

- Qwen2's pre-tokenizer regex + `ByteLevel(add_prefix_space=False)`, a byte-level decoder, and
  BPE merges learnt from a small built-in corpus (chat answers, maths, judge tags, paragraphs);
- ids 0..255 are the byte alphabet (id 0 is the real token "!", as in Llama-3 and Qwen2), and the
  special tokens `<|im_start|>`, `<|im_end|>` come after the merges;
- a ChatML chat template (`<|im_start|>role\\ncontent<|im_end|>\\n`, generation prompt
  `<|im_start|>assistant\\n`), eos `<|im_end|>` and NO pad token (Llama-3 has none).
"""

from __future__ import annotations

import itertools
from pathlib import Path

SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def corpus() -> list[str]:
    """A deterministic few-hundred-line training corpus with the text shapes the tests feed."""
    names = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo"]
    things = ["apples", "pears", "coins", "books", "cats", "stars"]
    lines = []
    for (a, b), name, thing in zip(itertools.product(range(2, 14), range(1, 9)), itertools.cycle(names),
                                   itertools.cycle(things)):
        lines.append(f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?")
        lines.append(f"The answer is {a + b}.\n\nSo {name} has {a + b} {thing}.")
        lines.append(f"Question: What is {a} + {b}?\nAnswer:\n{a + b}")
        lines.append(f"<think>\n{a} plus {b} makes {a + b}.\n</think>\n<score>{(a + b) % 2}</score>")
        lines.append(f"<think>The first answer is right.</think> <answer>[[{'AB'[a % 2]}]]</answer>")
        lines.append(f"Scores: \\boxed{{{a}, {b}}}\n\n- {name}: {thing}, {a}; {b}!")
        lines.append(f"Step one\n\n{name} counts {a} {thing}\n\nStep two\n\n{name} adds {b}\n\n{a + b}")
        lines.append(f"def count_{thing}(n):\n    total = n + {b}\n    return total\n")
    return lines


def build_bpe_tokenizer(path: str | Path | None = None, *, vocab_size: int = 640):
    """Train the tokenizer (a `PreTrainedTokenizerFast`); `save_pretrained` it to `path` when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    backend.train_from_iterator(corpus(), trainer)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML
    if path is not None:
        tok.save_pretrained(str(path))
    return tok

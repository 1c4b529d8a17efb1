"""Text in / text out around `generate`: chat templates, stop ids from the tokenizer, decoding.

    out = generate_text(model, tokenizer, ["What is 2+2?"], chat_template=True,
                        max_new_tokens=64, temperature=0.7, num_samples=4)
    out.texts       # B*num_samples decoded completions (row i*num_samples + j: sample j of prompt i)
    out.result      # the GenerationResult (token ids, mask, sampler log-probs, ...)

Prompts are rendered exactly as the trainers render them (`jaxrl_rm.data.pipeline.render_prompt`
and `encode`), so what is sampled here is what GRPO samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxrl_rm.sampling.sampler import GenerationResult, generate


@dataclasses.dataclass(frozen=True)
class TextGeneration:
    """texts: `B * num_samples` decoded completions; prompt_texts: the `B` prompts as rendered
    (chat template applied when asked); result: the underlying `GenerationResult`."""

    texts: list[str]
    prompt_texts: list[str]
    result: GenerationResult

    def grouped(self) -> list[list[str]]:
        """texts as `B` lists of `num_samples` completions."""
        n = len(self.texts) // max(len(self.prompt_texts), 1)
        return [self.texts[i * n:(i + 1) * n] for i in range(len(self.prompt_texts))]


def render_prompts(tokenizer, prompts, *, chat_template: bool = False) -> list[str]:
    """Prompts (strings, or chat message lists `[{"role", "content"}, ...]`) -> prompt texts.

    With `chat_template=True` the tokenizer's chat template is applied with the generation
    prompt (a plain string becomes one user message).
    """
    from jaxrl_rm.data.pipeline import render_prompt

    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts must be a list (one entry per prompt: a string or a message list)")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return [render_prompt(p, tokenizer, chat_template=chat_template) if (chat_template or not isinstance(p, str))
            else p for p in prompts]


def encode_prompts(tokenizer, prompts, *, chat_template: bool = False) -> list[list[int]]:
    """Prompts -> token ids (no special tokens added beyond what the template writes)."""
    from jaxrl_rm.data.pipeline import encode

    return [encode(tokenizer, t) for t in render_prompts(tokenizer, prompts, chat_template=chat_template)]


def default_stop_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's eos id plus the model config's eos id(s)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def decode_completions(tokenizer, result: GenerationResult, *, skip_special_tokens: bool = True) -> list[str]:
    """Decode each row's generated tokens (up to and including its stop token)."""
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    return tokenizer.batch_decode([tokens[i, :lengths[i]].tolist() for i in range(tokens.shape[0])],
                                  skip_special_tokens=skip_special_tokens)


def generate_text(model, tokenizer, prompts: Sequence, *, chat_template: bool = False,
                  stop_token_ids: Sequence[int] | None = None, skip_special_tokens: bool = True,
                  **generate_kwargs) -> TextGeneration:
    """Text prompts -> decoded completions (see the module docstring).

    stop_token_ids: default `default_stop_ids(tokenizer, model)` (eos). Other keywords go to
    `generate` (num_samples, max_new_tokens, temperature, top_p, top_k, seed, greedy, mesh, ...).
    """
    from jaxrl_rm.data.pipeline import encode

    texts = render_prompts(tokenizer, prompts, chat_template=chat_template)
    ids = [encode(tokenizer, t) for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} encodes to no tokens")
    if stop_token_ids is None:
        stop_token_ids = default_stop_ids(tokenizer, model)
    generate_kwargs.setdefault("pad_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None)
    result = generate(model, ids, stop_token_ids=stop_token_ids, **generate_kwargs)
    return TextGeneration(texts=decode_completions(tokenizer, result, skip_special_tokens=skip_special_tokens),
                          prompt_texts=texts, result=result)

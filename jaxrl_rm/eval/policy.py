"""Policy evaluation: greedy accuracy on verifiable problems, scored by a verifier."""

from __future__ import annotations

import numpy as np

from jaxrl_rm.data.pipeline import encode, render_prompt


def greedy_completions(model, tokenizer, prompts, *, max_prompt_length: int, max_new_tokens: int,
                       chat_template: bool = True, mesh=None, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) for prompts (str or chat messages)."""
    from jaxrl_rm.sampling import generate

    stop = [t for t in {tokenizer.eos_token_id} if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [encode(tokenizer, render_prompt(p, tokenizer, chat_template=chat_template))[-max_prompt_length:]
               for p in chunk]
        res = generate(model, ids, max_new_tokens=max_new_tokens, greedy=True, stop_token_ids=stop, mesh=mesh,
                       max_prompt_len=max_prompt_length, truncate_prompt="left", pad_id=pad)
        tokens, mask = np.asarray(res.tokens), np.asarray(res.mask)
        texts += tokenizer.batch_decode([row[m] for row, m in zip(tokens, mask)], skip_special_tokens=True)
    return texts


def verifiable_accuracy(model, tokenizer, items, verifier, **generation) -> float:
    """Fraction of `items` (with `.prompt` and `.answer`) whose greedy completion the verifier
    accepts. `verifier(responses, golds, prompts=...)` -> output with `.rewards`."""
    if not items:
        return float("nan")
    texts = greedy_completions(model, tokenizer, [it.prompt for it in items], **generation)
    out = verifier(texts, [it.answer for it in items], prompts=[it.prompt if isinstance(it.prompt, str) else ""
                                                             for it in items])
    return float(np.mean(np.asarray(out.rewards) > 0))

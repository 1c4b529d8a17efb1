"""Sampling: jitted prefill + while-loop decode over a KV cache, with temperature / top-k / top-p
/ stop tokens, per-token sampler log-probs, and text helpers (chat templates).

    generate(model, prompts, *, num_samples=1, max_new_tokens, temperature=1.0, top_p=1.0,
             top_k=0, stop_token_ids=(), seed=0, greedy=False, mesh=None, ...) -> GenerationResult
    generate_text(model, tokenizer, prompts, *, chat_template=False, **generate_kwargs) -> TextGeneration
"""

from jaxrl_rm.sampling.distribution import (filtered_logits, sample_reference, sample_tokens,
                                            token_logprobs, top_p_keep, unfiltered_logprobs)
from jaxrl_rm.sampling.sampler import (FINISH_LENGTH, FINISH_STOP, GenerationResult, bucket_length,
                                       bucket_rows, generate, teacher_forced_logprobs)
from jaxrl_rm.sampling.text import (TextGeneration, decode_completions, default_stop_ids, encode_prompts,
                                    generate_text, render_prompts)

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "GenerationResult", "TextGeneration", "bucket_length", "bucket_rows",
    "decode_completions", "default_stop_ids", "encode_prompts", "filtered_logits", "generate",
    "generate_text", "render_prompts", "sample_reference", "sample_tokens", "teacher_forced_logprobs",
    "token_logprobs", "top_p_keep", "unfiltered_logprobs",
]

"""Rollout requests (what callers hand the slot engine) and their identity.

A `Request` is one prompt (token ids) and how many samples to draw from it. Each sample owns a
*row* id: its random draws are `uniform(fold_in(fold_in(key(seed), row), step))`, exactly as in
`sampling.generate`, where row `i * num_samples + j` is sample j of prompt i. `assign_rows` gives
requests without an explicit `row` the same numbering (the cumulative count of samples before
them), so `SlotEngine.run(requests, seed=s)` reproduces `generate(prompts, num_samples=G,
seed=s)` row for row - whatever the slot count, batch composition or arrival order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to sample from.

    prompt_ids: `[L]` token ids (L >= 1, L <= the engine's `max_prompt_len`).
    num_samples: G completions of this prompt (they share one copy of its prompt KV).
    max_new_tokens: this request's budget (<= the engine's `max_new_tokens`); None = the engine's.
    seed: seed of its draws; None = the `seed` passed to `run`.
    row: row id of its first sample (sample j uses `row + j`); None = the number of samples of
        the requests before it in the `run` call (the `generate` numbering).
    """

    prompt_ids: Sequence[int]
    num_samples: int = 1
    max_new_tokens: int | None = None
    seed: int | None = None
    row: int | None = None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample to run (host bookkeeping): result row `index`, its request, and its draws' identity."""

    index: int      # row of the GenerationResult
    request: int    # index of its request in the run
    seed: int
    row: int
    limit: int      # max_new_tokens


def validate(requests: Sequence[Request], *, vocab_size: int, max_prompt_len: int, max_new_tokens: int
             ) -> list[np.ndarray]:
    """Check every request; return the prompts as int32 arrays. Errors name the request."""
    if not requests:
        raise ValueError("no requests given")
    prompts = []
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise TypeError(f"requests[{i}] is a {type(r).__name__}; expected jaxrl_rm.rollout.Request")
        if isinstance(r.prompt_ids, str):
            raise TypeError(f"requests[{i}].prompt_ids is a string; token ids are expected")
        p = np.asarray(r.prompt_ids, dtype=np.int64).reshape(-1)
        if p.size == 0:
            raise ValueError(f"requests[{i}] has an empty prompt; every prompt needs at least one token")
        if p.size > max_prompt_len:
            raise ValueError(f"requests[{i}] has {p.size} prompt tokens > the engine's max_prompt_len="
                             f"{max_prompt_len}")
        if p.min() < 0 or p.max() >= vocab_size:
            raise ValueError(f"requests[{i}] has token ids outside [0, {vocab_size})")
        if r.num_samples < 1:
            raise ValueError(f"requests[{i}].num_samples must be >= 1, got {r.num_samples}")
        if r.max_new_tokens is not None and not 1 <= r.max_new_tokens <= max_new_tokens:
            raise ValueError(f"requests[{i}].max_new_tokens must be in [1, {max_new_tokens}] (the engine's "
                             f"max_new_tokens), got {r.max_new_tokens}")
        if r.seed is not None and not 0 <= int(r.seed) < 2 ** 31:
            raise ValueError(f"requests[{i}].seed must be in [0, 2**31), got {r.seed}")
        prompts.append(p.astype(np.int32))
    return prompts


def expand(requests: Sequence[Request], *, seed: int, max_new_tokens: int) -> list[list[Sample]]:
    """Per request, its samples (result rows numbered in request order, then sample order)."""
    out, index, next_row = [], 0, 0
    for i, r in enumerate(requests):
        base = next_row if r.row is None else int(r.row)
        s = int(seed if r.seed is None else r.seed)
        limit = int(max_new_tokens if r.max_new_tokens is None else r.max_new_tokens)
        out.append([Sample(index=index + j, request=i, seed=s, row=base + j, limit=limit)
                    for j in range(r.num_samples)])
        index += r.num_samples
        next_row += r.num_samples
    return out


def shared_prefix_lengths(prompts: Sequence[np.ndarray], *, max_len: int, min_len: int,
                          window: int = 64) -> np.ndarray:
    """Per prompt, how many of its leading tokens to read from a shared prefix slot (0: none).

    The distinct prompts, sorted, are cut into runs of neighbours; a run shares its members'
    longest common prefix, capped at `max_len` and at each member's length - 1 (the last token is
    always prefilled with the prompt: its hidden state draws the first token). The cut maximises
    the prefill tokens saved, (run size - 1) x prefix length summed over runs (dynamic programming
    over runs of at most `window` prompts); a prefix shorter than `min_len` is not shared (it saves
    less than its extra prefill costs). So judge prompts (one template, then a question and its
    reference, then one of several responses) share template + question + reference per question
    rather than the template alone, or a few first tokens of the responses. Identical prompts are
    one distinct prompt (they reuse a prompt slot instead). -> `[N]` int64.
    """
    keys = {p.tobytes(): p for p in prompts}
    ordered = sorted(keys.values(), key=lambda p: p.tolist())
    n = len(ordered)

    def common(a, b):
        m = min(a.size, b.size)
        diff = np.flatnonzero(a[:m] != b[:m])
        return int(diff[0]) if diff.size else m

    adjacent = [common(ordered[i], ordered[i + 1]) for i in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: tokens saved over the first j prompts
    start = list(range(n + 1))  # start[j]: first prompt of the run that ends at prompt j - 1
    shared = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start[j], shared[j] = best[j - 1], j - 1, 0
        c = min(ordered[j - 1].size - 1, max_len)
        for i in range(j - 2, max(-1, j - 1 - window), -1):  # the run ordered[i:j]
            c = min(c, adjacent[i], ordered[i].size - 1)
            if c < min_len:
                break
            if best[i] + (j - i - 1) * c > best[j]:
                best[j], start[j], shared[j] = best[i] + (j - i - 1) * c, i, c
    length: dict[bytes, int] = {}
    j = n
    while j > 0:
        for p in ordered[start[j]:j]:
            length[p.tobytes()] = shared[j]
        j = start[j]
    return np.asarray([length[p.tobytes()] for p in prompts], np.int64)

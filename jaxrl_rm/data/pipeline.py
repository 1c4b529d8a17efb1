"""Tokenisation, padding / packing and deterministic, resumable batch streams.

A batch stream is a grain `MapDataset` indexed by step: `stream.batch(step)` is a pure function
of (records, seed, step), so the data-iterator state saved in a checkpoint is just the step, and a
resumed run sees exactly the batches the uninterrupted run would have seen. Each epoch is a fresh
permutation. In a multi-host run each process materialises only its rows of the global batch.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import grain
import jax
import numpy as np


# --- prompts and tokens -----------------------------------------------------------------------
def render_prompt(prompt, tokenizer, *, chat_template: bool = True) -> str:
    """A prompt (string or chat message list) -> the text the model sees before its response.

    With `chat_template` and a tokenizer that has one, the template is applied with the
    generation prompt; otherwise message contents are joined with newlines.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_pieces(tokenizer, prefix: str, continuations: Sequence[str], *,
                  prefix_ids: Sequence[int] | None = None) -> tuple[list[int], list[list[int]]]:
    """Ids of each `prefix + c` encoded as ONE string, split into a shared prefix part and one
    part per continuation: `(head, [tail_i])` with `head + tail_i == encode(prefix + c_i)`.

    Concatenating separately encoded pieces is wrong for byte-level BPE tokenizers (Llama-3,
    Qwen): their pre-tokenizer and merges cross the boundary — a chat prompt ending in "\\n"
    followed by an answer starting with "\\n" is the one token "\\n\\n" — so a model would be
    trained or scored on ids that the text never encodes to. Each split is at the first token
    where `prefix + c` stops agreeing with `prefix` encoded alone (`prefix_ids`, computed when
    not given), moved right past tokens that still decode to a piece of `prefix`: so a tail holds
    exactly the tokens that hold a character of its continuation (one that straddles the boundary
    included). The head is the part all continuations share. For a tokenizer where
    encode(a + b) == encode(a) + encode(b) (the character tokenizer) this is
    `(encode(prefix), [encode(c), ...])`.
    """
    prefix_ids = encode(tokenizer, prefix) if prefix_ids is None else list(prefix_ids)
    fulls, heads = [], []
    for c in continuations:
        full = encode(tokenizer, prefix + c)
        k, n = 0, min(len(prefix_ids), len(full))
        while k < n and full[k] == prefix_ids[k]:
            k += 1
        if k < len(prefix_ids):  # the boundary re-merged: keep the tokens that hold only prefix text
            while k < len(full) and prefix.startswith(
                    tokenizer.decode(full[:k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)):
                k += 1
        fulls.append(full)
        heads.append(full[:k])
    if not fulls:
        return prefix_ids, []
    k = min(len(h) for h in heads)
    for h in heads[1:]:
        k = next((j for j in range(k) if h[j] != heads[0][j]), k)
    return fulls[0][:k], [full[k:] for full in fulls]


def tokenize_prompt_response(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                             eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate prompt + response (+ eos) -> (ids `[L]` int32, loss_mask `[L]` bool on response).

    Longer than `max_length`: the response keeps its head (at most max_length - 1 tokens), the
    prompt keeps its tail in the remaining room.
    """
    response = list(response_ids) + ([eos_id] if eos_id is not None else [])
    response = response[: max_length - 1]
    room = max_length - len(response)
    prompt = list(prompt_ids)[-room:] if room > 0 else []
    ids = np.asarray(prompt + response, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt):] = True
    return ids, mask


def tokenize_sft(record, tokenizer, max_length: int, *, chat_template: bool = True):
    """SFTRecord -> (ids, loss_mask) with the loss on the response (and its eos) only.

    The ids are those of the rendered prompt and the response encoded as one text (then the eos
    id): the chat text the model will see. The loss covers every token that holds a character of
    the response, one merged across the prompt/response boundary included (`encode_pieces`).
    """
    prompt_ids, (response_ids,) = encode_pieces(
        tokenizer, render_prompt(record.prompt, tokenizer, chat_template=chat_template), [record.response])
    return tokenize_prompt_response(prompt_ids, response_ids, max_length, tokenizer.eos_token_id)


def check_demonstrations_fit(records, tokenizer, *, max_new_tokens: int, where: str, chat_template: bool = True,
                             tolerance: float = 0.05) -> None:
    """Raise ValueError when SFT demonstrations do not fit the RL budget they teach a format for.

    A warm-up demonstrates the output format that RL then parses. A demonstration whose response
    and end token need more than `max_new_tokens` cannot be reproduced in RL: the rollout is cut
    before the format ends and parses as invalid (the URPO ranking task once lost three quarters of
    its answers so: ``dchea \\boxed{10, 3, 7, 0}`` and its end token are 26 tokens, the budget was
    24). More than `tolerance` of `records` (SFTRecords) over the budget is an error naming `where`
    (the config keys to raise) and the length needed; a smaller tail is a warning. (Long prompts
    are not checked: RL and the warm-up both keep a prompt's tail.)
    """
    if not records:
        return
    lengths = []
    for r in records:
        _, (response_ids,) = encode_pieces(
            tokenizer, render_prompt(r.prompt, tokenizer, chat_template=chat_template), [r.response])
        lengths.append(len(response_ids) + (tokenizer.eos_token_id is not None))
    over_count = sum(n > max_new_tokens for n in lengths)
    if not over_count:
        return
    over = over_count / len(lengths)
    message = (f"{where}: max_new_tokens={max_new_tokens}, but {over_count} of the {len(lengths)} warm-up "
               f"demonstrations ({over:.1%}) need more (up to {max(lengths)} tokens with the end token): RL cuts "
               f"those answers before their format ends")
    if over > tolerance:
        raise ValueError(message)
    warnings.warn(message, stacklevel=2)


def pad_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict:
    """Right-pad -> input_ids `[N, L]` int32, loss_mask `[N, L]` bool, attention_mask `[N, L]` bool."""
    n = len(examples)
    ids = np.full((n, length), pad_id, np.int32)
    loss = np.zeros((n, length), bool)
    attn = np.zeros((n, length), bool)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)], loss[i, : len(x)], attn[i, : len(x)] = x, m, True
    return {"input_ids": ids, "loss_mask": loss, "attention_mask": attn}


def pack_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict:
    """First-fit packing into rows of `length` -> input_ids, loss_mask, segment_ids `[R, L]`
    (segment 0 = padding) and positions (restarting per segment). Order-deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, (x, _) in enumerate(examples):
        for r, free in enumerate(room):
            if free >= len(x):
                rows[r].append(i)
                room[r] -= len(x)
                break
        else:
            rows.append([i])
            room.append(length - len(x))
    ids = np.full((len(rows), length), pad_id, np.int32)
    loss = np.zeros((len(rows), length), bool)
    seg = np.zeros((len(rows), length), np.int32)
    pos = np.zeros((len(rows), length), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, start=1):
            x, m = examples[i]
            ids[r, at: at + len(x)], loss[r, at: at + len(x)] = x, m
            seg[r, at: at + len(x)], pos[r, at: at + len(x)] = s, np.arange(len(x))
            at += len(x)
    return {"input_ids": ids, "loss_mask": loss, "segment_ids": seg, "positions": pos,
            "attention_mask": seg > 0}


# --- batch streams ----------------------------------------------------------------------------
def length_bucket(n: int, cap: int, *, minimum: int = 16) -> int:
    """Padded width for a batch whose longest row is `n`: a power of two >= minimum, capped at
    `cap` (a row longer than `cap` keeps its length). Few distinct widths -> few compiles."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap) if n <= cap else n


class BatchStream:
    """Deterministic global batches over `rows` (a dict of equal-length `[N, ...]` arrays).

    `batch(step)` -> this process's slice of global batch `step`: rows
    `[p * B/P, (p+1) * B/P)` of it, where P = process count. Epoch e is permutation
    `rng(seed, e)` of the N rows; batches cross epoch boundaries seamlessly.

    `lengths` (`[N]` int, optional): each row's used width when the rows are right-padded to a
    common width W. Then every `[N, W, ...]` array of a batch is cut to `length_bucket` of the
    longest row in the *global* batch (the same width on every process), so a batch of short rows
    does not pay for W: exact for right padding, since the cut columns are padding.
    """

    def __init__(self, rows: dict, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 lengths: np.ndarray | None = None):
        self.rows = rows
        self.n = len(next(iter(rows.values())))
        if self.n == 0:
            raise ValueError("batch stream over zero examples")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        procs = jax.process_count()
        if batch_size % procs:
            raise ValueError(f"global batch size {batch_size} is not divisible by {procs} processes")
        self.local = batch_size // procs
        self._offset = jax.process_index() * self.local
        self._global = grain.MapDataset.range(1 << 62).map(self._row_index).batch(batch_size)
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and self.lengths.shape != (self.n,):
            raise ValueError(f"lengths has shape {self.lengths.shape}, expected ({self.n},)")
        self.width = max((v.shape[1] for v in rows.values() if np.ndim(v) >= 2), default=0)

    @functools.lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def _row_index(self, i: int) -> int:
        return int(self._perm(i // self.n)[i % self.n])

    def _global_and_local(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of global batch `step`, and of this process's part of it."""
        global_idx = np.asarray(self._global[step])
        return global_idx, global_idx[self._offset: self._offset + self.local]

    def indices(self, step: int) -> np.ndarray:
        """Row indices (into `rows`) of this process's part of global batch `step`."""
        return self._global_and_local(step)[1]

    def _width(self, global_idx: np.ndarray) -> int:
        """The padded width of a global batch (the full width without `lengths`)."""
        if self.lengths is None:
            return self.width
        return length_bucket(int(self.lengths[global_idx].max()), self.width)

    def batch(self, step: int) -> dict:
        global_idx, idx = self._global_and_local(step)
        width = self._width(global_idx)
        return {k: (v[idx, :width] if np.ndim(v) >= 2 and v.shape[1] == self.width else v[idx])
                for k, v in self.rows.items()}

    @property
    def steps_per_epoch(self) -> float:
        return self.n / self.batch_size


def stack_rows(batches: Sequence[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def as_numpy_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in batch.items()}

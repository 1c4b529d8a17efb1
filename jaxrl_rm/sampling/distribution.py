"""Next-token distributions: temperature, top-k, top-p (nucleus) and greedy, with log-probs.

The sampler's log-prob of a token is the log-prob under **the distribution actually sampled
from**: `log_softmax` of `logits / temperature` restricted to the tokens that survive top-k and
then top-p (HF's order: temperature -> top-k -> top-p), renormalised. With `top_k=0, top_p=1` it is
exactly `log_softmax(logits / temperature)`, which is what a teacher-forced forward pass
recomputes (`token_logprobs`). Greedy decoding reports the temperature-1, unfiltered log-prob.
With a filter on, the filtered log-prob also carries the log of the kept (nucleus) mass, so a
train/infer mismatch is measured on `unfiltered_logprobs` instead: `log_softmax(logits /
temperature)` of the sampled token before top-k / top-p, the quantity a trainer recomputes.

Two implementations of one definition:

* `filtered_logits` / `token_logprobs` / `sample_reference`: the plain reference (full sort for
  top-p, Gumbel-max over the full vocabulary). Readable, used by tests and teacher-forced checks.
* `sample_tokens`: the fast path the sampler runs every decode step. On CPU a full-vocabulary
  sort costs ~100x a matmul step and drawing `B*V` Gumbel variates ~10x, so it
  - draws **one uniform per row** and inverts the CDF hierarchically (chunk sums, then one chunk),
    which never lands on a token of zero probability;
  - finds the top-p cut by bisection on the float order of the logits (32 fused masked sums,
    no sort) when `top_k == 0`, and on the already-sorted `lax.top_k` values otherwise.
  Top-p ties at the cut are all kept (a sort would keep an arbitrary subset of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_CHUNK = 128  # vocabulary chunk of the hierarchical inverse CDF


# --- reference ----------------------------------------------------------------------------------
def filtered_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> jax.Array:
    """Reference filter: logits `[..., V]` -> `logits / T` with `-inf` outside top-k / top-p.

    top-k keeps the k largest; top-p then keeps the smallest prefix (by descending probability)
    whose mass reaches `top_p` - a token is kept iff the mass strictly before it is `< top_p`.
    """
    x = logits.astype(jnp.float32) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        # Ties at the cut: keep every token whose value equals a kept one (matches the fast path).
        cut = jnp.min(jnp.where(keep, x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= cut, x, -jnp.inf)
    return x


def token_logprobs(logits: jax.Array, tokens: jax.Array, *, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Teacher-forced log-probs under the sampler's distribution.

    logits `[..., V]` (any float dtype), tokens `[...]` int -> `[...]` float32.
    """
    x = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    logp = jax.nn.log_softmax(x, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sample_reference(key: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Reference sampler (Gumbel-max): logits `[B, V]` -> (tokens `[B]` int32, logp `[B]` f32)."""
    x = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(x, -1), tok[:, None], -1)[:, 0]
    return tok, logp


def unfiltered_logprobs(logits: jax.Array, tokens: jax.Array, *, temperature: jax.Array | float = 1.0
                        ) -> jax.Array:
    """`log_softmax(logits / temperature)` at `tokens`, ignoring top-k / top-p: logits `[B, V]`,
    tokens `[B]` int -> `[B]` float32. One fused pass (no scaled copy of the logits)."""
    x = logits.astype(jnp.float32)
    m = jnp.max(x, axis=-1)
    inv_t = 1.0 / temperature
    lse = jnp.log(jnp.sum(jnp.exp((x - m[:, None]) * inv_t), axis=-1))
    chosen = jnp.take_along_axis(x, tokens[:, None].astype(jnp.int32), -1)[:, 0]
    return (chosen - m) * inv_t - lse


# --- fast path ----------------------------------------------------------------------------------
def _sortable_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-inf < ... < -0 <= +0 < ... < +inf)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31).astype(bool)
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_p_keep(x: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus mask by bisection, no sort: x `[B, V]` f32 (scaled logits, `-inf` allowed)
    -> keep `[B, V]` bool.

    Token i is kept iff the probability mass of tokens with a strictly larger logit is
    `< top_p`. That predicate is monotone in the logit, so the cut is the smallest uint32 key
    (float order) where it holds, found in 32 bisection steps of one fused masked sum each.
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(x - m)
    target = top_p * jnp.sum(e, axis=-1)  # [B]
    keys = _sortable_bits(x)
    lo = jnp.min(keys, axis=-1)  # if the predicate already holds here, every token is kept
    hi = jnp.max(keys, axis=-1)  # mass above the max is 0 < target: the predicate holds

    def mass_above(t):  # [B]
        return jnp.sum(jnp.where(keys > t[:, None], e, 0.0), axis=-1)

    all_kept = mass_above(lo) < target

    def body(_, carry):  # invariant: predicate(lo) false, predicate(hi) true
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < target
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    cut = jnp.where(all_kept, lo, hi)
    return keys >= cut[:, None]


def _top_p_keep_sorted(vals: jax.Array, top_p: jax.Array) -> jax.Array:
    """vals `[B, k]` sorted descending -> keep `[B, k]` bool (ties at the cut kept)."""
    probs = jax.nn.softmax(vals, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cut = jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True)
    return vals >= cut


def _last_positive(w: jax.Array) -> jax.Array:
    """w `[B, n]` >= 0 -> index of the last positive entry `[B]` (0 if none)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
    return jnp.max(jnp.where(w > 0, iota, 0), axis=-1)


def argmax_first(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (first maximum) as two plain reductions: x `[B, V]` -> `[B]` int32.

    XLA:CPU lowers argmax to a variadic (value, index) reduce that does not vectorise; over a
    32k vocabulary it costs more than the LM-head matmul. max + masked min of an iota does not.
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1] - 1), axis=-1)


def _invert_cdf(w: jax.Array, target: jax.Array) -> jax.Array:
    """First index whose running sum of w `[B, n]` exceeds target `[B]`; never a zero weight."""
    cdf = jnp.cumsum(w, axis=-1)
    idx = jnp.sum(cdf <= target[:, None], axis=-1).astype(jnp.int32)
    return jnp.where(idx >= w.shape[-1], _last_positive(w), idx)


def _sample_categorical(logits: jax.Array, u: jax.Array, inv_temp: jax.Array | float = 1.0
                        ) -> tuple[jax.Array, jax.Array]:
    """Draw from softmax(logits * inv_temp): logits `[B, V]` f32 (`-inf` = excluded), u `[B]` in
    [0, 1), inv_temp > 0 scalar -> (index `[B]`, logp `[B]`).

    Hierarchical inverse CDF: chunk sums `[B, V/128]`, pick a chunk, then a token inside it.
    Only two passes read the `[B, V]` logits (max, then exp fused into the chunk sums); the
    chosen chunk's weights are recomputed. A chunk (token) is only picked where the running sum
    strictly increases, i.e. where its weight is positive, so excluded tokens are never drawn
    even under float rounding.
    """
    b, v = logits.shape
    m = jnp.max(logits, axis=-1, keepdims=True)
    chunk = _CHUNK if v > 2 * _CHUNK else v
    pad = (-v) % chunk
    if pad:
        logits = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    l3 = logits.reshape(b, -1, chunk)
    sums = jnp.sum(jnp.exp((l3 - m[:, :, None]) * inv_temp), axis=-1)  # [B, nc]
    csum = jnp.cumsum(sums, axis=-1)
    total = csum[:, -1]
    target = u * total
    j = jnp.sum(csum <= target[:, None], axis=-1).astype(jnp.int32)
    j = jnp.where(j >= sums.shape[-1], _last_positive(sums), j)
    before = jnp.where(j > 0, jnp.take_along_axis(csum, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.exp((jnp.take_along_axis(l3, j[:, None, None], axis=1)[:, 0] - m) * inv_temp)  # [B, chunk]
    i = _invert_cdf(inner, target - before)
    tok = j * chunk + i
    chosen = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0]
    logp = (chosen - m[:, 0]) * inv_temp - jnp.log(total)
    return tok, logp


def sample_tokens(logits: jax.Array, u: jax.Array, *, temperature: jax.Array | float = 1.0,
                  top_k: int = 0, top_p: jax.Array | float = 1.0, use_top_p: bool = False,
                  greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """One draw per row from the filtered distribution (fast path; see module docstring).

    logits `[B, V]` float32; u `[B]` uniforms in [0, 1); temperature / top_p may be traced;
    top_k, use_top_p (apply top_p at all) and greedy are static.
    Returns (tokens `[B]` int32, logp `[B]` float32 under the distribution sampled from;
    for greedy, `log_softmax(logits)` at temperature 1 without filtering).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        tok = argmax_first(logits)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return tok, jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - lse
    if top_k and top_k < logits.shape[-1]:
        vals, idx = jax.lax.top_k(logits / temperature, top_k)  # [B, k], sorted descending
        if use_top_p:
            vals = jnp.where(_top_p_keep_sorted(vals, top_p), vals, -jnp.inf)
        j, logp = _sample_categorical(vals, u)
        return jnp.take_along_axis(idx, j[:, None], -1)[:, 0].astype(jnp.int32), logp
    if use_top_p:
        x = logits / temperature
        tok, logp = _sample_categorical(jnp.where(top_p_keep(x, top_p), x, -jnp.inf), u)
    else:  # temperature folded into the exponent: no scaled copy of the logits
        tok, logp = _sample_categorical(logits, u, 1.0 / temperature)
    return tok.astype(jnp.int32), logp

"""Flax NNX decoder-only transformer for the Llama-3 / Qwen2 / Qwen3 families.

One module covers the three families; they differ only in switches on `ModelConfig`:
q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, RoPE scaling (Llama-3).
Weights are stored as `[in, out]` kernels; `models/hf.py` converts from/to HF's `[out, in]`.

The forward pass exposes final hidden states (`hidden_states`) so the log-prob kernels and the
scalar reward head read them without materialising logits, and a KV-cache path (`decode`) used by
the sampler. Attention softmax, RMSNorm statistics and logits are float32 whatever `dtype` is.

Layer layouts (`Transformer(..., scan_layers=...)`): unrolled (`layers` is an `nnx.List` of
`Block`s, paths `layers/<i>/...`) or scanned (`layers` is one `Block` whose weights carry a leading
layer dimension `[L, ...]`, paths `layers/...`, run with `jax.lax.scan`: the compiled program
holds one layer, so compile time no longer grows with depth). Both draw the same per-layer weights
for the same seed, and HF import/export maps either layout to the per-layer HF names
(`models/hf.py`), so a checkpoint changes layout through an HF save/load. `remat` wraps each
layer in `jax.checkpoint` with one of `REMAT_POLICIES` (only differentiation sees it).

Training speed on CPU: `linear` (every `Dense`) and `attention_core` have hand-written VJPs
that give XLA:CPU only "NN"/"NT" dots (see `_pin`); values and gradients are those of plain
autodiff (`benchmarks/train_step.py` measures the train step).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_rm.models.config import ModelConfig

_NEG_INF = float(jnp.finfo(jnp.float32).min)

# A KV cache (head-major, so the decode-step write is contiguous and attention needs no transpose
# of the cache). Unrolled layout: a list with one (k, v) pair per layer, each
# `[B, n_kv_heads, S, head_dim]`; scanned layout: one (k, v) pair, each `[L, B, n_kv_heads, S,
# head_dim]`. In both, every leaf is `[..., B, n_kv_heads, S, head_dim]`: code that only pads,
# repeats or shards a cache (the sampler) uses axes -4 (batch), -3 (heads) and -2 (slots). An int8
# cache (`init_cache(..., dtype="int8")`) has a `QuantizedKV` in place of each k / v: leaves
# `[..., B, kv, S, head_dim]` int8 and `[..., B, kv, S, 1]` float32, the same axes.
KVCache = list | tuple


# --- int8 KV cache -------------------------------------------------------------------------------
class QuantizedKV(NamedTuple):
    """One K or V cache leaf stored as int8 with a float32 scale per (token, KV head).

    values: int8 `[..., S, Dh]`; scale: float32 `[..., S, 1]`, symmetric absmax over Dh
    (`scale = max|x| / 127`, `x ~= values * scale`). Both leaves keep the cache's axes
    (`[..., B, kv, S, *]`), so code that pads, repeats, gathers or shards a cache along axes -4,
    -3 or -2 with `jax.tree.map` handles it unchanged; `values` comes first so that
    `cache_length` (the first leaf's axis -2) works. Memory per (token, head): `Dh + 4` bytes
    against `2 * Dh` in bf16 (0.53x at Dh = 64) and `4 * Dh` in float32 (0.27x).
    """

    values: jax.Array
    scale: jax.Array


KV_INT8 = "int8"
KV_SCALE_DTYPE = jnp.float32


def kv_cache_dtype_name(dtype) -> str | None:
    """Canonical (hashable) name of a KV cache dtype: None / "compute" -> None (the model's compute
    dtype); "int8" / `jnp.int8` -> "int8" (a `QuantizedKV` cache); any other dtype -> its name."""
    if dtype is None or (isinstance(dtype, str) and dtype == "compute"):
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt == jnp.int8:
        return KV_INT8
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"KV cache dtype must be None / 'compute', 'int8' or a float dtype, got {dtype!r}")
    return dt.name


def kv_slot_bytes(config: ModelConfig, dtype, compute_dtype, *, heads: int | None = None) -> int:
    """Bytes of one cache position of one row, K and V over every layer (`heads` KV heads, default
    all): `L * 2 * heads * Dh * itemsize`, or for int8 `L * 2 * heads * (Dh + 4)` (the scale)."""
    heads = config.num_key_value_heads if heads is None else heads
    name = kv_cache_dtype_name(dtype)
    if name == KV_INT8:
        per_head = config.dim_per_head + jnp.dtype(KV_SCALE_DTYPE).itemsize
    else:
        per_head = config.dim_per_head * jnp.dtype(name or compute_dtype).itemsize
    return config.num_hidden_layers * 2 * heads * per_head


def quantize_kv(x: jax.Array) -> QuantizedKV:
    """x `[..., Dh]` -> `QuantizedKV` (int8 `[..., Dh]`, float32 scale `[..., 1]`): symmetric absmax
    per row of Dh, so `|x - dequantize_kv(q)| <= scale / 2`; an all-zero row gets scale 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
    q = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0))
    return QuantizedKV(jnp.clip(q, -127, 127).astype(jnp.int8), scale.astype(KV_SCALE_DTYPE))


def dequantize_kv(x: jax.Array | QuantizedKV, dtype) -> jax.Array:
    """A cache leaf read as `dtype`: `values * scale` for a `QuantizedKV`, else a cast."""
    if isinstance(x, QuantizedKV):
        return x.values.astype(dtype) * x.scale.astype(dtype)
    return x.astype(dtype)


def read_kv(ck, cv, dtype) -> tuple[jax.Array, jax.Array]:
    """One layer's cache k, v (plain or `QuantizedKV`) as attention reads them: keys in `dtype`
    (the query's); values in the cache's own dtype, or dequantized to `dtype` for an int8 cache."""
    v_dtype = dtype if isinstance(cv, QuantizedKV) else cv.dtype
    return dequantize_kv(ck, dtype), dequantize_kv(cv, v_dtype)


def kv_update_slice(cache: jax.Array | QuantizedKV, new: jax.Array, start: tuple) -> jax.Array | QuantizedKV:
    """`dynamic_update_slice(cache, new, start)` for a plain leaf (cast to its dtype) or a
    `QuantizedKV` (`new [..., T, Dh]` quantized per row; the scale gets the same `start`)."""
    if isinstance(cache, QuantizedKV):
        q = quantize_kv(new)
        return QuantizedKV(jax.lax.dynamic_update_slice(cache.values, q.values, start),
                           jax.lax.dynamic_update_slice(cache.scale, q.scale, start))
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


def kv_set(cache: jax.Array | QuantizedKV, index, new: jax.Array, **kwargs) -> jax.Array | QuantizedKV:
    """`cache.at[index].set(new, **kwargs)` for a plain leaf (cast to its dtype) or a `QuantizedKV`
    (`index` addresses the axes before Dh; `new [..., Dh]` is quantized per row)."""
    if isinstance(cache, QuantizedKV):
        q = quantize_kv(new)
        return QuantizedKV(cache.values.at[index].set(q.values, **kwargs),
                           cache.scale.at[index].set(q.scale, **kwargs))
    return cache.at[index].set(new.astype(cache.dtype), **kwargs)


def kv_layer(cache: jax.Array | QuantizedKV, layer) -> jax.Array | QuantizedKV:
    """Slice `layer` (a traced int) of a stacked `[L, ...]` cache leaf, plain or quantized."""
    return jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, layer, keepdims=False), cache)

# `Transformer(remat=...)` / `model.remat`: what each layer saves for the backward pass.
#   none: everything (no recomputation); full: nothing but the layer's input (the whole layer is
#   recomputed in the backward); dots_saveable: matmul outputs (incl. attention scores);
#   dots_with_no_batch_dims_saveable: only the weight matmuls (q/k/v/o, MLP) - attention is
#   recomputed. Values and gradients are the same under every policy. On XLA:CPU the memory
#   saving shows only in the scanned layout (unrolled, CPU's scheduler runs the recomputation
#   early); XLA:TPU saves in both (`benchmarks/scan_layers.py` measures it).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_layer(fn, remat: str, *, prevent_cse: bool = True):
    """`fn` wrapped in `jax.checkpoint` with the policy named `remat` (see `REMAT_POLICIES`)."""
    if remat == "none":
        return fn
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def stack_layers(layers: list) -> Any:
    """Per-layer pytrees (NNX states or pure dicts, one structure) -> one pytree of `[L, ...]`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def unstack_layers(stacked: Any) -> list:
    """Inverse of `stack_layers`: a pytree of `[L, ...]` leaves -> L per-layer pytrees."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def cache_length(cache: KVCache) -> int:
    """Slots `S` of a KV cache in either layout."""
    return jax.tree.leaves(cache)[0].shape[-2]


def _pin(x):
    """On XLA:CPU, stop XLA from folding an explicit transpose back into the next dot.

    XLA:CPU runs a dot fast only when both operands already have the "NN" (or "NT") layout; a
    dot that contracts the major dimension of an operand (`x^T @ dy`, every weight gradient) is
    lowered to an explicit transpose *fused into the producer of that operand* (slow strided
    stores of e.g. the SwiGLU backward) plus a slower dot path. Materialising the transpose
    ourselves behind an optimization barrier makes it a plain copy of the smaller operand and
    the dot a plain "NN" product. Other backends transpose for free: identity there.
    """
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in] @ w [in, out]`, with a hand-written VJP laid out for XLA:CPU.

    Same values and gradients as `jnp.dot`; the backward computes `dw = pin(x^T) @ dy` (an "NN"
    product, see `_pin`) and `dx = dy @ w^T` (an "NT" product, fast as is).
    """
    return jnp.dot(x, w)


def _linear_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _linear_bwd(res, dy):
    x, w = res
    x_t = _pin(x.reshape(-1, x.shape[-1]).T)
    dw = jnp.dot(x_t, dy.reshape(-1, dy.shape[-1]))
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)`; kernel `[in, out]` stored in `param_dtype`, computed in `dtype`."""

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 std: float = 0.02):
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = linear(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm with float32 statistics (HF order: normalise in f32, cast, then scale)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse RoPE frequencies `[head_dim/2]` float32, with linear or Llama-3 scaling applied."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions `[B, T]` int -> cos, sin `[B, T, head_dim]` float32 (HF's half-split layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, H, Dh]`; rotates the two halves of the head dimension (HF `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


@jax.custom_vjp
def attention_core(q, k, v, mask):
    """Masked softmax attention, grouped-query, head-major (the training / prefill path).

    q `[B, kv, G, T, Dh]` (G query heads per KV head), k/v `[B, kv, S, Dh]`, mask `[B, T, S]`
    bool -> `[B, kv, G, T, Dh]` in v's dtype. Scores and softmax are float32; rows that may see
    nothing get a uniform softmax (finite, ignored by the losses). The VJP is written by hand so
    that every product is an "NN"/"NT" dot with no transpose of a `[T, S]` matrix (see `_pin`):
    it keeps the probabilities (float32 scores are not kept) and only transposes q and dout.
    """
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    b, kv, g, t, dh = q.shape
    s_len = k.shape[2]
    scores = jax.lax.dot_general(q.reshape(b, kv, g * t, dh), k, (((3,), (3,)), ((0, 1), (0, 1))),
                                 preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s_len) / math.sqrt(dh)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s_len)
    out = jnp.matmul(probs, v).reshape(b, kv, g, t, dh)
    return out, (q, k, v, probs, mask)


def _attention_bwd(res, d_out):
    q, k, v, probs, mask = res
    b, kv, g, t, dh = q.shape
    s_len = k.shape[2]
    d_out = d_out.reshape(b, kv, g * t, dh).astype(v.dtype)
    d_probs = jax.lax.dot_general(d_out, v, (((3,), (3,)), ((0, 1), (0, 1))),
                                  preferred_element_type=jnp.float32)
    p32 = probs.astype(jnp.float32)
    d_scores = p32 * (d_probs - jnp.sum(p32 * d_probs, axis=-1, keepdims=True))
    # Masked scores get no gradient (rows that see nothing have p = 1/S, not 0).
    d_scores = jnp.where(mask[:, None, None], d_scores.reshape(b, kv, g, t, s_len), 0.0) / math.sqrt(dh)
    d_scores = d_scores.astype(q.dtype).reshape(b, kv, g * t, s_len)
    dq = jnp.matmul(d_scores, k).reshape(q.shape)
    q_t, d_out_t = _pin((jnp.swapaxes(q.reshape(b, kv, g * t, dh), 2, 3), jnp.swapaxes(d_out, 2, 3)))
    dk = jnp.swapaxes(jnp.matmul(q_t, d_scores), 2, 3)  # [B, kv, S, Dh] via dk^T = q^T ds
    dv = jnp.swapaxes(jnp.matmul(d_out_t, probs), 2, 3)  # dv^T = dout^T p
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attention_core.defvjp(_attention_fwd, _attention_bwd)


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias and per-head q/k RMSNorm."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, kv, dh = (config.hidden_size, config.num_attention_heads,
                        config.num_key_value_heads, config.dim_per_head)
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, h * dh, use_bias=config.attention_bias, **dense)
        self.k_proj = Dense(d, kv * dh, use_bias=config.attention_bias, **dense)
        self.v_proj = Dense(d, kv * dh, use_bias=config.attention_bias, **dense)
        self.o_proj = Dense(h * dh, d, use_bias=False, **dense)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(dh, config.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, dh

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None, layer=None):
        """x `[B, T, D]`, mask `[B, T, S]` bool (query may see key) -> (`[B, T, D]`, new (k, v)).

        With `kv_cache` (k, v each `[B, kv, S, Dh]`, head-major), this step's keys/values are
        written at slots `cache_index .. cache_index+T` and attention runs over all S slots.
        With `layer` (an int scalar, the scanned layout), k/v are every layer's cache
        `[L, B, kv, S, Dh]`; this layer writes and reads slice `layer` and returns the whole cache.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            return self._cached(q, k, v, mask, kv_cache, cache_index, layer)
        kv, groups, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        # Head-major layout ([B, kv, groups, T, Dh]): both attention products are batched over
        # (B, kv) with the contracted dims innermost, so XLA needs no transposes of the scores.
        qh = q.reshape(b, t, kv, groups, dh).transpose(0, 2, 3, 1, 4)
        kh = k.astype(q.dtype).transpose(0, 2, 1, 3)
        out = attention_core(qh, kh, v.transpose(0, 2, 1, 3), mask)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, self.num_heads * dh)
        return self.o_proj(out.astype(q.dtype)), (k, v)

    def _cached(self, q, k, v, mask, kv_cache, cache_index, layer=None):
        """Attention over a head-major KV cache (the sampler's decode path).

        q `[B, T, H, Dh]`, k/v `[B, T, kv, Dh]` (this step), cache k/v `[B, kv, S, Dh]` (or
        `[L, B, kv, S, Dh]` with `layer`). The cache is laid out so that (a) the write of this
        step's keys is one contiguous `dynamic_update_slice` per head (in place inside a donated
        `while_loop` carry) and (b) both attention contractions are batched over (B, kv) with no
        transpose of the cache. A `QuantizedKV` cache (int8) stores this step's keys/values
        quantized (`kv_update_slice`) and is read dequantized (`_cached_attention`), except that a
        block of several tokens (a prefill) attends to its own keys/values unquantized, as a
        compute-dtype prefill would: only what later steps read from the cache is rounded.
        """
        ck, cv = kv_cache
        new_k, new_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        exact = (new_k, new_v, cache_index) if q.shape[1] > 1 else None
        if layer is None:
            start = (0, 0, cache_index, 0)
            ck = kv_update_slice(ck, new_k, start)
            cv = kv_update_slice(cv, new_v, start)
            out = self._cached_attention(q, ck, cv, mask, exact)
        else:  # write this layer's slot of the stacked cache (in place), then read its slice
            start = (layer, 0, 0, cache_index, 0)
            ck = kv_update_slice(ck, new_k[None], start)
            cv = kv_update_slice(cv, new_v[None], start)
            out = self._cached_attention(q, kv_layer(ck, layer), kv_layer(cv, layer), mask, exact)
        return out, (ck, cv)

    def _cached_attention(self, q, ck, cv, mask, exact=None):
        """q `[B, T, H, Dh]` over cache k/v `[B, kv, S, Dh]` (already written; plain arrays or
        `QuantizedKV`) -> `[B, T, D]`. Keys are read in q's dtype; values in the cache's dtype
        (an int8 cache: dequantized to q's dtype); the softmax is float32. `exact` (new k, new v
        `[B, kv, T, Dh]`, their first slot): for an int8 cache, read those slots unrounded."""
        b, t, _, dh = q.shape
        kv, groups = self.num_kv_heads, self.num_heads // self.num_kv_heads
        quantized = isinstance(cv, QuantizedKV)
        ck, cv = read_kv(ck, cv, q.dtype)
        if quantized and exact is not None:
            new_k, new_v, first = exact
            ck = jax.lax.dynamic_update_slice(ck, new_k.astype(ck.dtype), (0, 0, first, 0))
            cv = jax.lax.dynamic_update_slice(cv, new_v.astype(cv.dtype), (0, 0, first, 0))
        # [B, T, kv, g, Dh] -> [B, kv, g*T, Dh]: query rows of one kv head are contiguous.
        qh = q.reshape(b, t, kv, groups, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, groups * t, dh)
        scores = jnp.einsum("bkqd,bksd->bkqs", qh, ck,
                            preferred_element_type=jnp.float32) / math.sqrt(dh)
        scores = scores.reshape(b, kv, groups, t, -1)
        scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(cv.dtype).reshape(b, kv, groups * t, -1)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, cv)
        out = out.reshape(b, kv, groups, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * groups * dh)
        return self.o_proj(out.astype(q.dtype))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(config.hidden_size, config.intermediate_size, **dense)
        self.up_proj = Dense(config.hidden_size, config.intermediate_size, **dense)
        self.down_proj = Dense(config.intermediate_size, config.hidden_size, **dense)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder layer."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None, layer=None):
        attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, cache_index, layer)
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), new_kv


def attention_mask_from(*, batch: int, length: int, attention_mask=None, segment_ids=None) -> jax.Array:
    """Causal mask `[B, T, T]` bool, restricted to real tokens and to the same packed segment.

    attention_mask: `[B, T]` bool/int, 1 = real token (left or right padding).
    segment_ids: `[B, T]` int, packed sequences; 0 = padding.
    Rows of padding queries see nothing; their outputs are finite and ignored by the losses.
    """
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    mask = jnp.broadcast_to(causal, (batch, length, length))
    if attention_mask is not None:
        valid = attention_mask.astype(bool)
        mask = mask & valid[:, None, :] & valid[:, :, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same & (segment_ids[:, None, :] > 0)
    return mask


def default_positions(input_ids, attention_mask=None, segment_ids=None) -> jax.Array:
    """Positions `[B, T]`: 0.. per row, counting only real tokens (so left padding works), and
    restarting at each packed segment."""
    b, t = input_ids.shape
    if segment_ids is not None:
        idx = jnp.arange(t)[None, :]
        starts = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return (idx - seg_start).astype(jnp.int32)
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _layer_forward(graphdef, state, x, cos, sin, mask):
    """One decoder layer without a cache: (layer state, x `[B, T, D]`, ...) -> `[B, T, D]`.
    The unit that `remat_layer` wraps (weights passed explicitly, not closed over)."""
    return nnx.merge(graphdef, state)(x, cos, sin, mask)[0]


class Transformer(nnx.Module):
    """Decoder-only LM.

    `model(input_ids)` -> logits `[B, T, V]` float32. `hidden_states(...)` -> `[B, T, D]` after the
    final norm; `lm_head_weight()` -> `[D, V]`; `decode(...)` runs over a KV cache.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, with_lm_head: bool = True, scan_layers: bool = False,
                 remat: str = "none"):
        """with_lm_head=False drops the untied output projection (reward-model backbones).

        scan_layers: stack the layers' weights (`[L, ...]`) and run them with `jax.lax.scan`
          (see the module docstring); False keeps one `Block` per layer, unrolled.
        remat: per-layer rematerialisation policy, one of `REMAT_POLICIES`.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.scan_layers = bool(scan_layers)
        self.remat = remat
        self.embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), param_dtype))
        # Layers are drawn one by one in both layouts, so a seed gives the same weights in each.
        blocks = [Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(config.num_hidden_layers)]
        if self.scan_layers:
            self.layers = nnx.merge(nnx.graphdef(blocks[0]), stack_layers([nnx.state(b) for b in blocks]))
        else:
            self.layers = nnx.List(blocks)
        del blocks
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if config.tie_word_embeddings or not with_lm_head:
            self.lm_head = None
        else:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

    # --- building blocks -------------------------------------------------------------------
    def _run(self, input_ids, positions, mask, cache=None, cache_index=None):
        x = self.embed[...][input_ids].astype(self.dtype)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config))
        if self.scan_layers:
            x, new_cache = self._run_scanned(x, cos, sin, mask, cache, cache_index)
        elif cache is None:
            for layer in self.layers:
                graphdef, state = nnx.split(layer)
                x = remat_layer(functools.partial(_layer_forward, graphdef), self.remat)(state, x, cos, sin, mask)
            new_cache = None
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, cos, sin, mask, cache[i], cache_index)
                new_cache.append(kv)
        return self.final_norm(x), new_cache

    def _run_scanned(self, x, cos, sin, mask, cache, cache_index):
        """The layer stack as one `lax.scan` over the stacked weights (and the stacked cache,
        which rides in the carry so each layer's decode write stays an in-place update)."""
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:
            # Inside a scan the loop already keeps the recomputation apart: prevent_cse=False.
            layer = remat_layer(functools.partial(_layer_forward, graphdef), self.remat, prevent_cse=False)

            def body(x, state):
                return layer(state, x, cos, sin, mask), None

            return jax.lax.scan(body, x, stacked)[0], None

        def body_cached(carry, xs):
            x, kv = carry
            state, i = xs
            x, kv = nnx.merge(graphdef, state)(x, cos, sin, mask, kv, cache_index, i)
            return (x, kv), None

        layer_ids = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        (x, new_cache), _ = jax.lax.scan(body_cached, (x, tuple(cache)), (stacked, layer_ids))
        return x, new_cache

    def lm_head_weight(self) -> jax.Array:
        """Output projection `[D, V]` (the transposed embedding when tied)."""
        if self.lm_head is None:
            if not self.config.tie_word_embeddings:
                raise ValueError("this backbone was built without an lm_head (with_lm_head=False)")
            return self.embed[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden `[..., D]` -> logits `[..., V]` float32."""
        w = self.lm_head_weight().astype(self.dtype)
        return jnp.dot(hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)

    # --- public passes -----------------------------------------------------------------------
    def hidden_states(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None):
        """input_ids `[B, T]` int32 -> final hidden states `[B, T, D]` (compute dtype)."""
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        mask = attention_mask_from(batch=b, length=t, attention_mask=attention_mask,
                                   segment_ids=segment_ids)
        hidden, _ = self._run(input_ids, positions, mask)
        return hidden

    def __call__(self, input_ids, *, positions=None, attention_mask=None, segment_ids=None):
        """input_ids `[B, T]` int32 -> logits `[B, T, V]` float32."""
        return self.logits(self.hidden_states(input_ids, positions=positions,
                                              attention_mask=attention_mask, segment_ids=segment_ids))

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        """Zeroed KV cache for `batch` rows and `length` slots in `dtype` (default / "compute":
        the compute dtype): per layer (k, v), each `[batch, n_kv_heads, length, head_dim]`;
        scanned layout: one (k, v), each `[L, batch, n_kv_heads, length, head_dim]` (see
        `KVCache`). `dtype="int8"` (or `jnp.int8`): each k / v is a `QuantizedKV` (int8 values of
        that shape, float32 scales `[..., length, 1]`), written quantized and read dequantized."""
        c = self.config
        shape = (batch, c.num_key_value_heads, length, c.dim_per_head)
        name = kv_cache_dtype_name(dtype)
        if self.scan_layers:
            shape = (c.num_hidden_layers, *shape)

        def leaf():
            if name == KV_INT8:
                return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.zeros((*shape[:-1], 1), KV_SCALE_DTYPE))
            return jnp.zeros(shape, name or self.dtype)

        if self.scan_layers:
            return (leaf(), leaf())
        return [(leaf(), leaf()) for _ in range(c.num_hidden_layers)]

    def decode(self, input_ids, cache: KVCache, *, positions, cache_index, kv_mask):
        """Run `T` new tokens over a KV cache.

        input_ids `[B, T]`; positions `[B, T]` (RoPE positions of the new tokens);
        cache_index: scalar int, the slot where the first new token is written;
        kv_mask `[B, S]` bool: which cache slots hold real tokens (after this write).
        Returns (hidden `[B, T, D]`, updated cache). Query t sees slots `<= cache_index + t`.
        """
        b, t = input_ids.shape
        s = cache_length(cache)
        slots = jnp.arange(s)[None, None, :]
        query_slot = cache_index + jnp.arange(t)[None, :, None]
        mask = (slots <= query_slot) & kv_mask[:, None, :]
        return self._run(input_ids, positions, mask, cache, cache_index)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_dtype_of(model: nnx.Module) -> Any:
    return jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype

"""SFT train-step throughput: `jaxrl_rm` (jit: forward, backward, AdamW) vs PyTorch eager, same weights.

What is measured (one run, this machine, CPU, float32 everywhere):
  * a random-weight Qwen2-style causal LM of ~20M parameters (config `MODEL` below: hidden 512,
    4 layers, 8 query heads / 2 KV heads of 64, SwiGLU 1408, vocab 8192, untied LM head, q/k/v
    bias), built with `transformers`, saved with `save_pretrained` and loaded with
    `jaxrl_rm.models.hf.load_model`, so both sides start from exactly the same weights;
  * one SFT step on a batch of 8 x 256 random tokens (no padding, every next token is a target):
    JAX = `jaxrl_rm.train.state.build_train_step(Trainer, jaxrl_rm.train.sft.next_token_loss)`
    (hidden states -> chunked log-prob kernel -> summed NLL / count, grad, global-norm clip 1.0,
    optax AdamW), jitted with the state donated; PyTorch = `Qwen2ForCausalLM(input_ids,
    labels=input_ids).loss` (mean NLL over the same 8 x 255 targets), `.backward()`,
    `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (same lr, betas, eps, weight decay),
    `torch.set_num_threads(2)`. XLA:CPU uses both cores by default;
  * both sides are warmed up (JAX compile time reported separately as `jax_compile_s`), then
    `--steps` timed steps of each are interleaved (jax, torch, torch, jax, jax, torch, ...) so
    background load hits both alike; the median step time of each side is reported, `ratio` =
    torch median / JAX median. The first step's loss of both sides is reported too (same
    weights and batch, so they agree to ~1e-6);
  * FLOPs per step, counted from the config: 6 * (matmul parameters) * tokens for the linear
    layers (q, k, v, o, gate, up, down per layer over 8*256 tokens, LM head over the 8*255
    predicted tokens; the embedding lookup is not a matmul) plus attention 12 * L * T^2 * (H*Dh)
    per sequence for fwd+bwd (QK^T and PV, counted over the full T x T square, i.e. causal
    masking NOT halved; `attn_flops_fraction` says how much of the total this is). Nothing
    else (norms, softmax, AdamW) is counted, nor the LM-head logits that the chunked log-prob
    kernel recomputes in its backward instead of storing them (+1/3 of the head's FLOPs, ~8% of
    the step's counted FLOPs);
  * peak = the best of several large float32 matmuls (2048x2048 @ 2048x2048) in JAX in the same
    process, interleaved with the timed steps; `mfu` = achieved FLOP/s of the JAX step / that
    peak, `torch_mfu` = achieved FLOP/s of the torch step / the same JAX peak; the torch matmul
    peak (`torch.mm`, MKL) is measured and reported for reference (`torch_peak_gflops`);
  * the machine is shared (2 cores, other jobs running), so wall times move with the load:
    `load_avg_1min` (before, after), `*_cpu_per_wall` (process CPU seconds per wall second of a
    step; 2.0 = both cores all the time) and every step's time are reported, and besides the
    headline `mfu` (median step vs best peak) two auxiliary ratios: `mfu_fastest_step` (fastest
    step vs best peak) and `mfu_paired` (median over steps of step FLOP/s / the peak measured
    just before that step, so both sides of each ratio saw about the same load).

Prints one JSON object as the last line.

    python benchmarks/train_step.py [--steps 5] [--skip-torch]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import numpy as np

BATCH, LENGTH = 8, 256
MODEL = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=1408, tie_word_embeddings=False,
             max_position_embeddings=1024, rope_theta=1000000.0, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
OPTIM = dict(learning_rate=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
PEAK_N = 2048


def build_hf(path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MODEL)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init leaves biases at 0 and norms at 1: randomise them (as tests do)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def step_flops() -> dict:
    """FLOPs of one train step (fwd + bwd), from the config; see the module docstring."""
    d, L, v = MODEL["hidden_size"], MODEL["num_hidden_layers"], MODEL["vocab_size"]
    h, kv, f = MODEL["num_attention_heads"], MODEL["num_key_value_heads"], MODEL["intermediate_size"]
    dh = d // h
    per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
    tokens, predicted = BATCH * LENGTH, BATCH * (LENGTH - 1)
    linear = 6 * (L * per_layer * tokens + d * v * predicted)
    attention = BATCH * 12 * L * LENGTH ** 2 * h * dh
    return dict(linear=linear, attention=attention, total=linear + attention,
                matmul_params=L * per_layer + d * v)


# --- matmul peak ---------------------------------------------------------------------------------
@functools.cache
def _jax_peak_inputs():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((PEAK_N, PEAK_N), np.float32))
    b = jnp.asarray(rng.standard_normal((PEAK_N, PEAK_N), np.float32))
    return jax.jit(jnp.matmul), a, b


def jax_matmul_peak(repeats: int = 3) -> float:
    """Best FLOP/s of a jitted [N, N] @ [N, N] float32 matmul (one call = one product)."""
    import jax

    mm, a, b = _jax_peak_inputs()
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_N ** 3 / best


def torch_matmul_peak(repeats: int = 3) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(PEAK_N, PEAK_N, generator=g)
    b = torch.randn(PEAK_N, PEAK_N, generator=g)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_N ** 3 / best


# --- the two train steps -------------------------------------------------------------------------
def make_jax_step(model, batch_np):
    import jax
    from flax import nnx

    from jaxrl_rm.config import OptimConfig
    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.parallel.rules import shard_batch
    from jaxrl_rm.train.sft import next_token_loss
    from jaxrl_rm.train.state import Trainer, build_train_step, make_optimizer

    cfg = OptimConfig(schedule="constant", warmup_steps=0, **OPTIM)
    mesh = make_mesh()
    trainer = Trainer(graphdef=nnx.split(model)[0], optimizer=make_optimizer(cfg, 1000), mesh=mesh)
    state = trainer.init_state(model, seed=0)
    step_fn = build_train_step(trainer, next_token_loss, micro_batches=1)
    batch = shard_batch(batch_np, mesh)
    holder = {"state": state}

    def run() -> tuple[float, float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        new_state, metrics = step_fn(holder["state"], batch)
        jax.block_until_ready((new_state, metrics))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        holder["state"] = new_state
        return dt, float(metrics["loss"]), cpu

    return run


def make_torch_step(model, batch_np):
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["learning_rate"],
                            betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                            weight_decay=OPTIM["weight_decay"])
    ids = torch.tensor(batch_np["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch_np["attention_mask"], dtype=torch.long)

    def run() -> tuple[float, float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()
        return time.perf_counter() - t0, float(loss.detach()), time.process_time() - c0

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compile")
    ap.add_argument("--skip-torch", action="store_true", help="only time the JAX side")
    args = ap.parse_args()

    import jax
    import torch

    torch.set_num_threads(2)
    from jaxrl_rm.models import hf
    from jaxrl_rm.models.transformer import count_params

    with tempfile.TemporaryDirectory() as tmp:
        torch_model = build_hf(tmp)
        model = hf.load_model(tmp)
    n_params = count_params(model)
    assert n_params == sum(p.numel() for p in torch_model.parameters()), n_params
    ids = np.random.default_rng(0).integers(3, MODEL["vocab_size"], (BATCH, LENGTH)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones(ids.shape, bool)}

    jax_step = make_jax_step(model, batch)
    del model
    t0 = time.perf_counter()
    jax_loss0 = jax_step()[1]
    compile_s = time.perf_counter() - t0
    torch_step = make_torch_step(torch_model, batch) if not args.skip_torch else None
    torch_loss0 = torch_step()[1] if torch_step else None
    for _ in range(args.warmup):
        jax_step()
        if torch_step:
            torch_step()

    load_before = os.getloadavg()[0]
    jax_times, torch_times, jax_peaks, torch_peaks, jax_cpu, torch_cpu = [], [], [], [], [], []
    for i in range(args.steps):
        # peak right before each JAX step (paired MFU); alternate which side goes first
        def timed_jax():
            jax_peaks.append(jax_matmul_peak())
            dt, _, cpu = jax_step()
            jax_times.append(dt), jax_cpu.append(cpu)

        def timed_torch():
            torch_peaks.append(torch_matmul_peak())
            dt, _, cpu = torch_step()
            torch_times.append(dt), torch_cpu.append(cpu)

        order = [timed_jax] + ([timed_torch] if torch_step else [])
        for fn in (order if i % 2 == 0 else order[::-1]):
            fn()
    compile_s -= statistics.median(jax_times)

    flops = step_flops()
    peak = max(jax_peaks)
    t_jax = statistics.median(jax_times)
    tokens = BATCH * LENGTH
    out = dict(
        benchmark="train_step", device=str(jax.devices()[0].device_kind), dtype="float32",
        model="qwen2-style random", params=n_params, matmul_params=flops["matmul_params"],
        config={k: MODEL[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads",
                                      "intermediate_size", "tie_word_embeddings")},
        batch=BATCH, seq_len=LENGTH, tokens_per_step=tokens, steps=args.steps,
        flops_per_step=flops["total"], attn_flops_fraction=round(flops["attention"] / flops["total"], 4),
        attn_flops_causal="full T^2 (not halved)",
        jax_step_s=round(t_jax, 4), jax_compile_s=round(compile_s, 2),
        jax_tokens_per_s=round(tokens / t_jax, 1),
        jax_gflops=round(flops["total"] / t_jax / 1e9, 2),
        peak_gflops=round(peak / 1e9, 2), peak_matmul=f"{PEAK_N}x{PEAK_N}@{PEAK_N}x{PEAK_N} f32, jax, best",
        mfu=round(flops["total"] / t_jax / peak, 3),
        # Auxiliary (the machine is shared; see the docstring): fastest step vs best peak, and
        # the median over steps of (step FLOP/s / the peak measured just before that step).
        mfu_fastest_step=round(flops["total"] / min(jax_times) / peak, 3),
        mfu_paired=round(statistics.median(
            flops["total"] / t / p for t, p in zip(jax_times, jax_peaks)), 3),
        jax_step_s_all=[round(t, 3) for t in jax_times],
        jax_cpu_per_wall=round(statistics.median(c / t for c, t in zip(jax_cpu, jax_times)), 2),
        load_avg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        jax_loss_step0=round(jax_loss0, 6),
    )
    if torch_step:
        t_torch = statistics.median(torch_times)
        out.update(
            torch_step_s=round(t_torch, 4), torch_tokens_per_s=round(tokens / t_torch, 1),
            torch_gflops=round(flops["total"] / t_torch / 1e9, 2),
            torch_mfu=round(flops["total"] / t_torch / peak, 3),
            torch_step_s_all=[round(t, 3) for t in torch_times],
            torch_cpu_per_wall=round(statistics.median(c / t for c, t in zip(torch_cpu, torch_times)), 2),
            torch_peak_gflops=round(max(torch_peaks) / 1e9, 2),
            ratio=round(t_torch / t_jax, 3), torch_loss_step0=round(torch_loss0, 6),
            torch_threads=torch.get_num_threads(),
        )
    else:
        out.update(torch_tokens_per_s=None, ratio=None)
    print(__doc__.split("\n\n")[0])
    print(f"{n_params / 1e6:.2f}M params, {BATCH}x{LENGTH} tokens, {flops['total'] / 1e9:.1f} GFLOP/step; "
          f"JAX step {t_jax:.3f}s (median of {args.steps}), "
          + (f"torch step {out['torch_step_s']:.3f}s" if torch_step else "torch skipped"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

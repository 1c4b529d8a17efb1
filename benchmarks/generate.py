"""Sampling throughput: `jaxrl_rm.sampling.generate` vs `transformers` `generate`, same weights.

What is measured (one run, this machine, CPU):
  * a random-weight Qwen2-style causal LM of ~20M parameters, built with `transformers`, saved
    with `save_pretrained` and loaded with `jaxrl_rm.models.hf.load_model` (so both sides run
    exactly the same weights, float32);
  * batch 32, 64-token prompts, 128 new tokens, ancestral sampling at temperature 1 (no top-k,
    no top-p, no stop tokens, so every row generates all 128 tokens on both sides);
  * tokens/s = 32 * 128 / wall time of one whole `generate` call (prefill + decode +
    host transfer), steady state: the JAX side is compiled first (`compile_s` = the first call
    minus a steady one, reported separately), HF gets a short warm-up call, and the best of
    `--repeats` calls is taken for each side; the two sides run alternately so that background
    load hits both alike. `*_tokens_per_cpu_s` divide by process CPU time instead (all threads)
    and `load_avg_1m` is the machine's load at start and end. torch runs in two processes, with
    OpenMP's default wait policy (fastest on a quiet machine) and with PASSIVE (on a shared
    machine spinning threads that lose their core stall: 3-5x slower measured here); HF is
    credited with the faster of the two;
  * the torch side runs in its own process (spawned, so its OpenMP threads never share a process
    with XLA's), the JAX side in this one;
  * the matmul roofline of this machine, measured in the same run: the weight matmuls of one
    decode step at this batch size (`[32, D] @ W` for q, k, v, o, gate, up, down of every layer
    and the LM head), run alone in a jitted loop. `roofline_fraction` = time of those matmuls /
    time of one decode step inside `generate` (decode step time = (t(128 tokens) - t(1 token)) /
    127, i.e. prefill excluded). Attention-over-cache FLOPs are not counted (they are < 3%).

With `--model PATH` (a local HF causal-LM folder, e.g. SmolLM2-135M-Instruct converted by
`python -m jaxrl_rm.models.gguf --out PATH`) both sides load that folder's weights instead (float32;
the prompts are random ids of its vocabulary; everything else as above).

Prints one JSON object as the last line.

    python benchmarks/generate.py [--repeats 3] [--skip-hf] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time

import numpy as np

BATCH, PROMPT, NEW = 32, 64, 128
# ~20M parameters, Qwen2 layout (q/k/v bias, GQA, tied embeddings like the small Qwen2 models).
MODEL = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=1024, tie_word_embeddings=True,
             max_position_embeddings=1024, rope_theta=1000000.0, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_hf(path: str, **config_overrides):
    """The ~20M model (`MODEL`, with `config_overrides`) with seeded random weights, saved to `path`."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**MODEL, **config_overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_generate(model, prompts: np.ndarray, seed: int, new: int = NEW) -> tuple[float, float]:
    """-> (wall s, process CPU s) of one `transformers` generate call."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor(prompts, dtype=torch.long)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                             min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape == (BATCH, PROMPT + new), out.shape
    return wall, cpu


def hf_worker(conn, path: str, build: bool) -> None:
    """Separate process for the torch side (its OpenMP threads and XLA's never share a process):
    builds + saves the model (or loads it), then serves `hf_generate` requests until None."""
    import torch
    import transformers

    model = build_hf(path) if build else transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        prompts, seed, new = msg
        conn.send(hf_generate(model, prompts, seed, new))


def jax_generate(model, prompts, seed: int, new: int = NEW) -> tuple[float, float]:
    """-> (wall s, process CPU s) of one `jaxrl_rm.sampling.generate` call (results on host)."""
    import jax

    from jaxrl_rm.sampling import generate

    t0, c0 = time.perf_counter(), time.process_time()
    res = generate(model, prompts, max_new_tokens=new, temperature=1.0, seed=seed)
    jax.block_until_ready(res.tokens)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.tokens.shape == (BATCH, new) and int(res.lengths.min()) == new
    return wall, cpu


def matmul_roofline(model, steps: int = 64):
    """-> (time_once, FLOPs per step): `time_once()` times the weight matmuls of `steps` decode
    steps alone and returns seconds per step.

    The same products as one decode step at batch 32 (x `[32, D]`): q, k, v, o, gate, up, down
    per layer and the LM head (`[D, V]`, as the sampler runs it), chained through the minimum of
    elementwise glue that keeps every product live and step-dependent (so XLA can neither drop
    nor hoist them).
    """
    import jax
    import jax.numpy as jnp

    layers = [(l.attn.q_proj.kernel[...], l.attn.k_proj.kernel[...], l.attn.v_proj.kernel[...],
               l.attn.o_proj.kernel[...], l.mlp.gate_proj.kernel[...], l.mlp.up_proj.kernel[...],
               l.mlp.down_proj.kernel[...]) for l in model.layers]
    head = jnp.asarray(model.lm_head_weight())
    flops = 2 * BATCH * (sum(w.size for ws in layers for w in ws) + head.size)

    @jax.jit
    def run(layers, head, x):
        def step(_, x):
            for wq, wk, wv, wo, wg, wu, wd in layers:
                q, k, v = x @ wq, x @ wk, x @ wv
                x = x + 1e-3 * (q @ wo) + 1e-9 * (jnp.sum(k, -1, keepdims=True) + jnp.sum(v, -1, keepdims=True))
                x = x + 1e-3 * ((x @ wg) * (x @ wu)) @ wd
            return x + 1e-9 * jnp.max(x @ head, axis=-1, keepdims=True)
        return jax.lax.fori_loop(0, steps, step, x)

    x0 = jnp.full((BATCH, model.config.hidden_size), 0.01, jnp.float32)
    jax.block_until_ready(run(layers, head, x0))

    def time_once() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(run(layers, head, x0))
        return (time.perf_counter() - t0) / steps

    return time_once, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="only time the JAX side")
    ap.add_argument("--model", default=None, help="a local HF causal-LM folder to time instead of the "
                                                  "random-weight ~20M Qwen2-style model")
    args = ap.parse_args()

    import jax

    from jaxrl_rm.models import hf
    from jaxrl_rm.models.transformer import count_params

    # Two torch processes: OpenMP's default wait policy (threads spin a while, then sleep) and
    # PASSIVE (they sleep at once). On a quiet machine the default is faster, on a shared one
    # PASSIVE is (spinning threads that lose their core stall every parallel region). HF is
    # credited with the better of the two. (Not ACTIVE: its threads would spin forever, stealing
    # the cores from the JAX side between HF calls.)
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ([] if args.skip_hf else ["default", "passive"]) or ["default"]:
            os.environ.pop("OMP_WAIT_POLICY", None)  # read by the child's OpenMP at start
            if policy == "passive":
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            conn, child = ctx.Pipe()
            build = args.model is None and not workers  # the first process builds the random model
            proc = ctx.Process(target=hf_worker, args=(child, args.model or tmp, build), daemon=True)
            proc.start()
            assert conn.recv() == "ready"
            workers[policy] = (proc, conn)
        os.environ.pop("OMP_WAIT_POLICY", None)
        model = hf.load_model(args.model or tmp)  # the very weights the torch processes hold
    n_params = count_params(model)
    cfg = model.config
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (BATCH, PROMPT)).astype(np.int32)

    def hf_call(policy, seed, new=NEW):
        conn = workers[policy][1]
        conn.send((prompts, seed, new))
        return conn.recv()

    load_start = os.getloadavg()[0]
    compile_s = jax_generate(model, prompts, seed=0)[0]
    jax_generate(model, prompts, seed=0, new=1)  # compiles the 1-token bucket (prefill timing)
    roofline, step_flops = matmul_roofline(model)
    if not args.skip_hf:
        for policy in workers:
            hf_call(policy, 0, new=2)  # warm-up (lazy initialisation)

    jax_runs, prefill_runs, mm_runs = [], [], []
    hf_runs = {policy: [] for policy in workers} if not args.skip_hf else {}
    for r in range(args.repeats):  # alternate the sides so background load hits them alike
        jax_runs.append(jax_generate(model, prompts, seed=r + 1))
        prefill_runs.append(jax_generate(model, prompts, seed=r + 1, new=1))
        mm_runs.append(roofline())
        for policy in hf_runs:
            hf_runs[policy].append(hf_call(policy, r))
    for proc, conn in workers.values():
        conn.send(None)
        proc.join(timeout=60)
    t_jax = min(w for w, _ in jax_runs)
    compile_s -= t_jax  # first call = compile + one run
    step_s = (t_jax - min(w for w, _ in prefill_runs)) / (NEW - 1)
    mm_s = min(mm_runs)
    tokens = BATCH * NEW
    hf_best = {p: min(runs) for p, runs in hf_runs.items()}  # (wall, cpu) of the fastest call
    policy = min(hf_best, key=lambda p: hf_best[p][0]) if hf_best else None
    t_hf, cpu_hf = hf_best[policy] if policy else (None, None)
    cpu_jax = min(c for _, c in jax_runs)
    result = {
        "benchmark": "generate",
        "model": (f"{args.model}: {cfg.model_type}" if args.model else "qwen2-style random weights")
                 + f", {n_params / 1e6:.1f}M params, vocab {cfg.vocab_size}, d={cfg.hidden_size}, "
                 f"L={cfg.num_hidden_layers}, heads {cfg.num_attention_heads}:{cfg.num_key_value_heads}, float32",
        "batch": BATCH, "prompt_len": PROMPT, "new_tokens": NEW, "temperature": 1.0,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} cores",
        "jax_tokens_per_s": round(tokens / t_jax, 1),
        "hf_tokens_per_s": round(tokens / t_hf, 1) if t_hf else None,
        "ratio": round(t_hf / t_jax, 2) if t_hf else None,
        "compile_s": round(compile_s, 2),
        "jax_s": round(t_jax, 3), "hf_s": round(t_hf, 3) if t_hf else None,
        # Process CPU time (all threads): less sensitive to other jobs on a shared machine.
        "jax_tokens_per_cpu_s": round(tokens / cpu_jax, 1),
        "hf_tokens_per_cpu_s": round(tokens / cpu_hf, 1) if cpu_hf else None,
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "hf_omp_wait_policy": policy,
        "hf_tokens_per_s_by_omp_policy": {p: round(tokens / w, 1) for p, (w, _) in hf_best.items()},
        "prefill_s": round(min(w for w, _ in prefill_runs), 4),
        "decode_step_ms": round(step_s * 1e3, 3),
        "matmul_only_step_ms": round(mm_s * 1e3, 3),
        "matmul_roofline_gflops": round(step_flops / mm_s / 1e9, 1),
        "roofline_fraction": round(mm_s / step_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

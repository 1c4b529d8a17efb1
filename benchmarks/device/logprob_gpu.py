"""The log-prob hot loop on a GPU (prepared for the lent H100/H200; `--smoke` runs it here on CPU).

One script, one JSON line last, inside ~8 minutes on an H200:

1. correctness of every path against the dense float32 reference — chunked (XLA, cuBLAS), Pallas
   (Triton kernels, compiled for the GPU), and under the default `impl="auto"` — on
   `N = 1031` (odd) × `D = 1024` × `V = 151936`, float32 and bfloat16, with entropy and
   temperature 0.7: log-probs, entropy, d_hidden, d_lm_head (max error relative to the largest
   reference value), and that Pallas compiles at D = 896 … 8192 (bf16, forward + backward);
2. timing at `N 16384 × D 4096 × V 151936`, bf16 inputs (float32 accumulation): forward and
   forward + backward of dense XLA / chunked / Pallas, each in a fresh subprocess (so the
   device's peak-memory counter is its own): median of `--reps` calls after one warm-up, ms,
   peak device memory (`memory_stats()["peak_bytes_in_use"]`), compiled XLA temp bytes,
   useful TFLOP/s = (2·NDV forward, 8·NDV forward + backward) / time, and its fraction of the
   H200's ~790 TFLOP/s bf16 peak (`--peak-tflops`; NVIDIA's sheet says 989 dense).

Run: `python benchmarks/device/logprob_gpu.py` (on the GPU machine) or `--smoke` (tiny shapes,
any backend; Pallas in interpret mode where the backend is not a GPU). Numbers go to
docs/accelerators.md with the date, device and jax version this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
MIB = 2**20


def _inputs(n, d, v, dtype, seed=0):
    import jax
    import jax.numpy as jnp

    kh, kw, kt = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(kh, (n, d), jnp.float32).astype(dtype)
    lm_head = (jax.random.normal(kw, (d, v), jnp.float32) * d**-0.5).astype(dtype)
    targets = jax.random.randint(kt, (n,), 0, v, jnp.int32)
    return hidden, lm_head, targets


def _impl_kwargs(impl: str) -> dict:
    import jax

    if impl == "dense":
        return {"impl": "reference"}
    if impl == "pallas":
        on_gpu = jax.default_backend() == "gpu"
        return {"impl": "pallas", "pallas_platform": "gpu", "interpret": not on_gpu}
    return {"impl": impl}


def _value_and_grads(hidden, lm_head, targets, *, temperature, **kw):
    import jax
    import jax.numpy as jnp

    from jaxrl_rm.kernels import token_logprobs

    n = targets.shape[0]
    gl = jnp.cos(jnp.arange(n, dtype=jnp.float32))  # arbitrary per-token cotangents, as RL has
    ge = jnp.sin(1.0 + jnp.arange(n, dtype=jnp.float32))

    def loss(h, w):
        logp, ent = token_logprobs(h, w, targets, temperature=temperature, with_entropy=True, **kw)
        return jnp.sum(gl * logp) + jnp.sum(ge * ent), (logp, ent)

    (_, (logp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, lm_head)
    return [jax.device_get(x) for x in (logp, ent, dh, dw)]


def correctness(args) -> dict:
    """Every path vs the float32 reference (computed from the same, possibly bf16, inputs)."""
    import jax.numpy as jnp
    import numpy as np

    n, d, v = (37, 64, 1000) if args.smoke else (1031, 1024, 151936)
    out = {"shape": [n, d, v]}
    names = ("logp", "entropy", "d_hidden", "d_lm_head")
    for dtype in ("float32", "bfloat16"):
        h, w, t = _inputs(n, d, v, jnp.dtype(dtype), seed=1)
        ref = _value_and_grads(h.astype(jnp.float32), w.astype(jnp.float32), t, temperature=0.7,
                               impl="reference")
        for impl in ("chunked", "pallas", "auto"):
            try:
                got = _value_and_grads(h, w, t, temperature=0.7, **(_impl_kwargs(impl) if impl != "auto" else {}))
            except Exception as e:  # a path that fails is a result, not the end of the run
                out[f"{impl}_{dtype}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                continue
            errs = {nm: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                              / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))
                    for nm, a, b in zip(names, got, ref)}
            out[f"{impl}_{dtype}_max_rel_err"] = {k: float(f"{x:.2e}") for k, x in errs.items()}
    # Pallas compiles (and runs once) at real widths
    widths = (64, 96) if args.smoke else (896, 1536, 2048, 3584, 4096, 8192)
    compiled = {}
    for d_ in widths:
        h, w, t = _inputs(256 if args.smoke else 2048, d_, 1000 if args.smoke else 32000, jnp.bfloat16, seed=2)
        try:
            _value_and_grads(h, w, t, temperature=1.0, **_impl_kwargs("pallas"))
            compiled[d_] = "ok"
        except Exception as e:
            compiled[d_] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["pallas_bf16_fwd_bwd_by_d"] = compiled
    return out


def worker(args) -> dict:
    """One (impl, fwd | fwd_bwd) timing in this fresh process."""
    import jax
    import jax.numpy as jnp

    from jaxrl_rm.kernels import token_logprobs

    n, d, v = args.n, args.d, args.v
    h, w, t = _inputs(n, d, v, jnp.bfloat16)
    kw = _impl_kwargs(args.worker)

    def loss(h, w):
        return jnp.sum(token_logprobs(h, w, t, **kw))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)) if args.mode == "fwd_bwd" else loss)
    compiled = fn.lower(h, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(h, w))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(h, w))
        times.append(time.perf_counter() - t0)
    times.sort()
    stats = jax.devices()[0].memory_stats() or {}
    ms = times[len(times) // 2] * 1e3
    flops = (8 if args.mode == "fwd_bwd" else 2) * n * d * v
    return {"impl": args.worker, "mode": args.mode, "ms": round(ms, 3), "min_ms": round(times[0] * 1e3, 3),
            "temp_mib": round(temp / MIB, 1),
            "peak_mib": round(stats.get("peak_bytes_in_use", 0) / MIB, 1) if stats else None,
            "useful_tflops": round(flops / (ms / 1e3) / 1e12, 2)}


def timing(args) -> dict:
    rows = {}
    for mode in ("fwd", "fwd_bwd"):
        for impl in ("dense", "chunked", "pallas"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--mode", mode,
                   "--n", str(args.n), "--d", str(args.d), "--v", str(args.v), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False,
                                  timeout=args.worker_timeout)
            if proc.returncode:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                rows[f"{impl}_{mode}"] = {"error": tail[0][:300]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["fraction_of_peak"] = round(row["useful_tflops"] / args.peak_tflops, 3)
                rows[f"{impl}_{mode}"] = row
            print(f"  {impl:8s} {mode:8s} {rows[f'{impl}_{mode}']}", flush=True)
    best = min((r for k, r in rows.items() if k.endswith("fwd_bwd") and "ms" in r), key=lambda r: r["ms"], default=None)
    dense = rows.get("dense_fwd_bwd", {})
    out = {"rows": rows}
    if best:
        out["best_fwd_bwd"] = best["impl"]
        out["best_fwd_bwd_fraction_of_peak"] = best["fraction_of_peak"]
        if dense.get("peak_mib") and best.get("peak_mib"):
            out["dense_over_best_peak_memory"] = round(dense["peak_mib"] / best["peak_mib"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--v", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the bf16 peak to compare with")
    p.add_argument("--worker-timeout", type=int, default=150)
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fwd_bwd", help=argparse.SUPPRESS)
    args = p.parse_args()
    small = (256, 128, 4096, 2) if args.smoke else (16384, 4096, 151936, 5)
    args.n, args.d, args.v, args.reps = (x if x is not None else s for x, s in
                                         zip((args.n, args.d, args.v, args.reps), small))
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import jax

    t0 = time.time()
    dev = jax.devices()[0]
    result = {"measured": "token_logprobs on one device: correctness vs the f32 reference, then bf16 timing",
              "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "backend": jax.default_backend(),
              "device": getattr(dev, "device_kind", str(dev)), "smoke": args.smoke,
              "timing_shape": {"n": args.n, "d": args.d, "v": args.v, "dtype": "bfloat16"},
              "peak_tflops_assumed": args.peak_tflops}
    if not args.skip_correctness:
        result["correctness"] = correctness(args)
        print(f"  correctness: {result['correctness']}", flush=True)
    result["timing"] = timing(args)
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

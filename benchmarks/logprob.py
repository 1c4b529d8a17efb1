"""Benchmark of the log-prob hot loop: dense `reference` vs `chunked` (+ Pallas interpret, small).

What is measured, for `jax.grad` of the summed token log-probs w.r.t. `hidden` and `lm_head`
(float32, N=4096 tokens, D=512, V=151936 by default):

* working memory: XLA's temporary buffers of the compiled function,
  `jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes` (inputs and outputs
  are the same for every implementation, so they are left out);
* peak RSS of the whole process, for the record: every implementation runs in a fresh
  subprocess (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), so one cannot inflate another;
* wall time of one compiled call: the minimum over `--rounds` x `--reps` calls after a warm-up
  call. Subprocesses alternate (reference, chunked, reference, chunked, ...) and the minimum is
  reported because other work on a shared machine only ever adds time. Process CPU time is
  reported next to it.

Also reported: a "lean" dense variant (logsumexp + masked-sum target logit instead of
`log_softmax` + gather; fewer `[N, V]` buffers), so that the comparison is not only against
the textbook dense code, and the Pallas kernels in interpret mode on a small shape (interpret
mode is an emulator: its time says nothing about TPU/GPU speed).

Usage: `python benchmarks/logprob.py [--n 4096 --d 512 --v 151936 --rounds 3 --reps 2]`.
The last line of output is one JSON object.

`--tpu-aot TOPOLOGY` (e.g. v5e:2x2, v5p:2x2x1, v6e:2x2; needs the tpu-aot extra) instead compiles
for that TPU generation on this machine (libtpu, nothing runs) and reports, per point of the
matrix D x V x dtype (`--d-list`, `--v-list`, `--dtypes`; default the whole matrix of issue 16)
and for dense / chunked / Pallas side by side: per-chip XLA temp memory of forward and
forward + backward at `--n` tokens per chip, compile time, and the matmul FLOPs of each
implementation's structure in units of N*D*V (each kernel module's `FLOPS_PER_NDV`). Then the
data-parallel scaling: per-chip temp of the chunked and Pallas fwd+bwd at `--n` x chips tokens on
1 chip vs all of the topology's chips on `data`, and whether any activation was all-gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MB = 2**20


def _lean_dense(hidden, lm_head, targets):
    """Dense, but with one [N, V] buffer fewer than the textbook form (for the record)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    z = jnp.dot(hidden, lm_head, precision=lax.Precision.HIGHEST)
    lse = jax.nn.logsumexp(z, axis=-1)
    cols = jnp.arange(z.shape[1], dtype=jnp.int32)
    zt = jnp.sum(jnp.where(cols == targets[:, None], z, 0.0), axis=-1)
    return zt - lse


def worker(args) -> dict:
    """Runs in a fresh process: compile, measure temp memory, time `reps` calls, report RSS."""
    import resource

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, REPO)
    from jaxrl_rm.kernels import token_logprobs

    n, d, v = args.n, args.d, args.v
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (n, d), jnp.float32)
    lm_head = jax.random.normal(kw, (d, v), jnp.float32) * (1.0 / d**0.5)
    targets = jax.random.randint(kt, (n,), 0, v, jnp.int32)

    blocks = {}
    if args.impl == "lean_dense":
        logp_fn = _lean_dense
    else:
        if args.impl != "reference":
            blocks = {k: x for k, x in (("block_tokens", args.block_tokens),
                                        ("block_vocab", args.block_vocab)) if x}
        logp_fn = lambda h, w, t: token_logprobs(h, w, t, impl=args.impl, **blocks)

    loss = lambda h, w, t: jnp.sum(logp_fn(h, w, t))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, lm_head, targets).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    out = compiled(hidden, lm_head, targets)
    jax.block_until_ready(out)
    walls, cpus = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(hidden, lm_head, targets))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    import numpy as np

    checksum = sum(float(np.sum(np.abs(np.asarray(g)), dtype=np.float64)) for g in out)
    return {"impl": args.impl, "temp_mb": temp / MB, "walls": walls, "cpus": cpus,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "checksum": checksum, "blocks": blocks}


def pallas_small(args) -> dict:
    """Pallas (Mosaic flavour, interpret mode) vs reference on a small shape, for the record."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, REPO)
    from jaxrl_rm.kernels import token_logprobs

    n, d, v = 256, 128, 4096
    kh, kw, kt = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(kh, (n, d), jnp.float32)
    lm_head = jax.random.normal(kw, (d, v), jnp.float32) * (1.0 / d**0.5)
    targets = jax.random.randint(kt, (n,), 0, v, jnp.int32)
    res = {"pallas_shape": {"n": n, "d": d, "v": v, "dtype": "float32"}}
    grads = {}
    for name, kw_ in (("pallas_interpret", {"impl": "pallas", "block_tokens": 128,
                                            "block_vocab": 1024}),
                      ("reference_small", {"impl": "reference"})):
        f = jax.jit(jax.grad(lambda h, w, kw_=kw_: jnp.sum(token_logprobs(h, w, targets, **kw_)),
                             argnums=(0, 1)))
        t0 = time.perf_counter()
        jax.block_until_ready(f(hidden, lm_head))
        res[f"{name}_first_call_s"] = time.perf_counter() - t0  # includes compilation
        t0 = time.perf_counter()
        grads[name] = jax.block_until_ready(f(hidden, lm_head))
        res[f"{name}_s"] = time.perf_counter() - t0
    err = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
              for a, b in zip(grads["pallas_interpret"], grads["reference_small"]))
    res["pallas_vs_reference_max_rel_err"] = float(f"{err:.2e}")
    return res


def _spawn(args, impl: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--n", str(args.n),
           "--d", str(args.d), "--v", str(args.v), "--reps", str(args.reps)]
    if args.block_tokens:
        cmd += ["--block-tokens", str(args.block_tokens)]
    if args.block_vocab:
        cmd += ["--block-vocab", str(args.block_vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {impl} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


AOT_D = (896, 1536, 2048, 3584, 4096, 8192)
AOT_V = (32000, 128256, 151936)


def tpu_aot(args) -> dict:
    """Compile the matrix for `args.tpu_aot` (a TPU topology); see the module docstring."""
    sys.path.insert(0, REPO)
    from jaxrl_rm.kernels import chunked, pallas_tpu, reference
    from jaxrl_rm.parallel import aot

    flops = {name: {**f, "forward_backward": f["forward"] + f["backward"]} for name, f in (
        ("reference", reference.FLOPS_PER_NDV), ("chunked", chunked.FLOPS_PER_NDV),
        ("pallas", pallas_tpu.FLOPS_PER_NDV))}
    print(f"  matmul FLOPs / (N D V), fwd + bwd: {flops}", flush=True)
    one = aot.tpu_mesh(args.tpu_aot, (1, 1, 1))
    impls = ["chunked", "pallas"] + ([] if args.no_dense else ["reference"])
    points, failures = [], []
    for dtype in args.dtypes.split(","):
        for d in [int(x) for x in args.d_list.split(",")]:
            for v in [int(x) for x in args.v_list.split(",")]:
                row = {"d": d, "v": v, "dtype": dtype}
                for impl in impls:
                    for backward in (False, True):
                        key = f"{impl}_{'fwd_bwd' if backward else 'fwd'}"
                        try:
                            rep = aot.token_logprobs_report(one, n=args.n, d=d, v=v, dtype=dtype,
                                                            impl=impl, backward=backward)
                        except Exception as e:  # a compile failure is a result: report it, go on
                            row[f"{key}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                            failures.append(f"{dtype} D{d} V{v} {key}")
                            continue
                        row[f"{key}_temp_mib"] = round(rep.temp_bytes / MB, 1)
                        row[f"{key}_compile_s"] = round(rep.compile_seconds, 1)
                ok = "pallas_fwd_bwd_temp_mib" in row and "chunked_fwd_bwd_temp_mib" in row
                row["pallas_within_chunked_plus_64mib"] = (
                    ok and row["pallas_fwd_bwd_temp_mib"] <= row["chunked_fwd_bwd_temp_mib"] + 64)
                points.append(row)
                print("  " + " ".join(f"{k}={x}" for k, x in row.items()), flush=True)

    chips = len(aot.tpu_devices(args.tpu_aot))
    scaling = {}
    for impl in ("chunked", "pallas"):
        kw = dict(n=args.n * chips, d=args.scaling_d, v=args.scaling_v, dtype="bfloat16", impl=impl)
        single = aot.token_logprobs_report(one, **kw)
        dp = aot.token_logprobs_report(aot.tpu_mesh(args.tpu_aot, (chips, 1, 1)), **kw)
        gathered = [s for s in dp.all_gather_shapes if s and s[0] in (kw["n"], kw["n"] // chips)]
        scaling[impl] = {"temp_mib_1_chip": round(single.temp_bytes / MB, 1),
                         f"temp_mib_{chips}_chips": round(dp.temp_bytes / MB, 1),
                         "temp_ratio": round(single.temp_bytes / dp.temp_bytes, 2) if dp.temp_bytes else None,
                         "activation_all_gathers": len(gathered), "collectives": dp.collectives}
        print(f"  data-parallel {impl}: {scaling[impl]}", flush=True)
    import jax

    return {"measured": "XLA temp bytes per chip of compiled token_logprobs (libtpu AOT; nothing ran)",
            "topology": args.tpu_aot, "jax": jax.__version__, "tokens_per_chip": args.n,
            "flops_per_ndv": flops, "points": points, "compile_failures": failures,
            "all_pallas_within_chunked_plus_64mib": all(p["pallas_within_chunked_plus_64mib"] for p in points),
            "data_parallel": {"chips": chips, "d": args.scaling_d, "v": args.scaling_v, **scaling}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--reps", type=int, default=2, help="timed calls per subprocess")
    p.add_argument("--rounds", type=int, default=3, help="alternating subprocesses per impl")
    p.add_argument("--block-tokens", type=int, default=None, help="chunked; default: library's")
    p.add_argument("--block-vocab", type=int, default=None, help="chunked; default: library's")
    p.add_argument("--no-lean", action="store_true", help="skip the lean dense variant")
    p.add_argument("--no-pallas", action="store_true", help="skip the Pallas interpret record")
    p.add_argument("--tpu-aot", default=None, metavar="TOPOLOGY",
                   help="compile the D x V x dtype matrix for this TPU topology (libtpu) instead")
    p.add_argument("--d-list", default=",".join(map(str, AOT_D)), help="--tpu-aot hidden sizes")
    p.add_argument("--v-list", default=",".join(map(str, AOT_V)), help="--tpu-aot vocab sizes")
    p.add_argument("--dtypes", default="bfloat16,float32", help="--tpu-aot dtypes")
    p.add_argument("--no-dense", action="store_true", help="--tpu-aot: skip the dense reference")
    p.add_argument("--scaling-d", type=int, default=2048, help="--tpu-aot data-parallel D")
    p.add_argument("--scaling-v", type=int, default=32000, help="--tpu-aot data-parallel V")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pallas-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.impl = args.worker
        print(json.dumps(worker(args)))
        return
    if args.pallas_worker:
        print(json.dumps(pallas_small(args)))
        return
    if args.tpu_aot:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        print(json.dumps(tpu_aot(args)))
        return

    load_start = os.getloadavg()[0]
    impls = ["reference", "chunked"] + ([] if args.no_lean else ["lean_dense"])
    runs: dict[str, list[dict]] = {k: [] for k in impls}
    for r in range(args.rounds):
        for impl in impls:
            runs[impl].append(_spawn(args, impl))
            print(f"  round {r}: {impl:10s} walls {[round(x, 2) for x in runs[impl][-1]['walls']]}"
                  f" s, temp {runs[impl][-1]['temp_mb']:.1f} MB", flush=True)
    pallas = {}
    if not args.no_pallas:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--pallas-worker"],
                              capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode:
            raise RuntimeError(f"pallas worker failed:\n{proc.stdout}\n{proc.stderr}")
        pallas = json.loads(proc.stdout.strip().splitlines()[-1])

    def agg(impl):
        rs = runs[impl]
        walls = sorted(x for r in rs for x in r["walls"])
        return {"temp_mb": rs[0]["temp_mb"], "s": walls[0], "median_s": walls[len(walls) // 2],
                "cpu_s": min(x for r in rs for x in r["cpus"]),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "checksum": rs[0]["checksum"],
                "blocks": rs[0]["blocks"]}

    ref, ch = agg("reference"), agg("chunked")
    temp_ratio = ch["temp_mb"] / ref["temp_mb"]
    time_ratio = ch["s"] / ref["s"]
    result = {
        "shapes": {"n": args.n, "d": args.d, "v": args.v, "dtype": "float32"},
        "naive_temp_mb": round(ref["temp_mb"], 1),
        "chunked_temp_mb": round(ch["temp_mb"], 1),
        "naive_peak_rss_mb": round(ref["peak_rss_mb"], 1),
        "chunked_peak_rss_mb": round(ch["peak_rss_mb"], 1),
        "naive_s": round(ref["s"], 3),
        "chunked_s": round(ch["s"], 3),
        "naive_median_s": round(ref["median_s"], 3),
        "chunked_median_s": round(ch["median_s"], 3),
        "naive_cpu_s": round(ref["cpu_s"], 3),
        "chunked_cpu_s": round(ch["cpu_s"], 3),
        "chunked_temp_fraction": round(temp_ratio, 5),
        "chunked_time_ratio": round(time_ratio, 3),
        "chunked_cpu_ratio": round(ch["cpu_s"] / ref["cpu_s"], 3),
        "meets_memory_target": temp_ratio <= 1 / 16,
        "meets_time_target": time_ratio <= 1.0,
        "chunked_blocks": ch["blocks"] or "library defaults",
        "grad_abs_sum_rel_diff": float(f'{abs(ch["checksum"] - ref["checksum"]) / ref["checksum"]:.2e}'),
        "timing": f"min wall over {args.rounds}x{args.reps} calls in alternating fresh processes",
        "loadavg_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if not args.no_lean:
        lean = agg("lean_dense")
        result.update({"lean_dense_temp_mb": round(lean["temp_mb"], 1),
                       "lean_dense_s": round(lean["s"], 3),
                       "lean_dense_cpu_s": round(lean["cpu_s"], 3),
                       "lean_dense_peak_rss_mb": round(lean["peak_rss_mb"], 1)})
    result.update({k: (round(x, 4) if isinstance(x, float) and not k.endswith("_err") else x)
                   for k, x in pallas.items()})

    print(f"grad of sum(log p) w.r.t. hidden [{args.n}, {args.d}] and lm_head [{args.d}, {args.v}],"
          " float32, CPU:")
    print(f"  reference (dense log_softmax): temp {ref['temp_mb']:.0f} MB, peak RSS "
          f"{ref['peak_rss_mb']:.0f} MB, {ref['s']:.2f} s (cpu {ref['cpu_s']:.2f} s)")
    print(f"  chunked (custom_vjp):          temp {ch['temp_mb']:.1f} MB, peak RSS "
          f"{ch['peak_rss_mb']:.0f} MB, {ch['s']:.2f} s (cpu {ch['cpu_s']:.2f} s)")
    print(f"  chunked working memory = 1/{1 / temp_ratio:.0f} of reference (target <= 1/16), "
          f"time = {time_ratio:.2f}x reference (target <= 1.0x).")
    print("  The chunked backward recomputes the logits (4 matmuls of N*D*V vs 3 for dense), so on"
          " a compute-bound CPU it wins time only by skipping the dense path's [N, V] memory"
          " passes; working memory is XLA temp buffers, RSS includes inputs, outputs and runtime.")
    if not args.no_lean:
        print(f"  for the record, lean dense (logsumexp + masked sum): temp {lean['temp_mb']:.0f} MB, "
              f"{lean['s']:.2f} s (cpu {lean['cpu_s']:.2f} s)")
    if pallas:
        print(f"  pallas (Mosaic kernels, interpret mode, {pallas['pallas_shape']}): "
              f"{pallas['pallas_interpret_s']:.3f} s per call ({pallas['pallas_interpret_first_call_s']:.1f} s"
              f" with compilation), reference {pallas['reference_small_s']:.3f} s; max rel grad "
              f"diff vs reference {pallas['pallas_vs_reference_max_rel_err']:.1e}")
    print(f"  timing: {result['timing']}; load average {result['loadavg_start_end']} on "
          f"{os.cpu_count()} cores. On a shared machine wall times move with other jobs; the "
          f"process CPU-time ratio ({result['chunked_cpu_ratio']:.2f}x) is the steadier figure.")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

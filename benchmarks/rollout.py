"""Rollout throughput and memory: the slot engine (`jaxrl_rm.rollout.SlotEngine`) vs the static
sampler (`jaxrl_rm.sampling.generate`) vs `transformers` generate, on a long-tailed workload.

Throughput (one run, this machine, CPU, float32, same weights on every side):
  * `--requests` prompts (default 256) of random ids, lengths uniform in `--prompt-min..max`;
    a fraction `--long-frac` (default 10%) of the requests gets `--long` new tokens (512), the
    others a budget uniform in `--short-min..max` (48..80, "stop near 64"). Budgets stand in for
    the stop token of a trained policy (a random-weight model has no meaningful one): a request's
    completion ends at its budget; there are no stop ids on any side, ancestral sampling at T=1.
  * static sides (`generate`, transformers): the requests in their order, in batches of
    `--slots` rows (the engine's concurrency); each batch decodes until its longest row ends
    (`max_new_tokens` = the longest budget in the batch) - what a static batch does when its
    rows stop at different times. Only each row's budget counts as useful.
  * engine: `--slots` sample slots, one `run` over all requests; each request is given the
    row id and seed its static batch gives it, so both sides draw the same samples
    (`same_samples` = fraction of requests whose tokens agree, a check).
  * useful tokens/s = sum of budgets / wall time (steady state: each side is compiled / warmed
    up first; compile time is not counted). Sides run one after another in this process (torch
    in a spawned process, so its OpenMP threads never share one with XLA's). transformers is
    slow on CPU, so it runs only the first `--hf-batches` static batches (default 1); its
    tokens/s is over those, next to the static sampler's on the same batches.
    `load_avg_*`: the machine's 1-minute load (the CPU may be shared).

Memory (G samples per prompt, `--mem-prompt`-token prompts, `--mem-prompts` prompts, so
G x prompts sample rows): the bytes of the prompt KV as stored - the engine's shared prompt cache
(one row per prompt slot, `num_prompt_slots = rows / G`) vs the static sampler's cache, which
holds a copy of the prompt per sample row (`jnp.repeat` G times) - and XLA's compiled memory plan
(arguments + outputs - aliased + temporaries) of each side's program at those shapes.

Judge prompts with shared prefixes (`--judge-*`): `--judge-questions` questions x
`--judge-responses` responses, each prompt a `--judge-template`-token template, then a
`--judge-question`-token question + reference, then a `--judge-response`-token response, and a
`--judge-new`-token verdict (RLLM's pointwise judge). The same requests through the engine with
shared prefixes (`max_prefix_len`), the engine without, and the static sampler: wall time of the
whole call (prefill included: it is what sharing saves), tokens prefilled, and whether the
samples agree.

Prints one JSON object as the last line.

    python benchmarks/rollout.py [--quick] [--model PATH] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

from generate import build_hf as build_generate_model  # the ~20M model of benchmarks/generate.py


def build_hf(path: str):
    """benchmarks/generate.py's ~20M Qwen2 model, with room for 512-token prompts + 512 new tokens."""
    return build_generate_model(path, max_position_embeddings=2048)


def hf_worker(conn, path: str, build: bool) -> None:
    """torch side in its own process: serves (prompts, max_new) batches until None."""
    import torch
    import transformers

    model = build_hf(path) if build else transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        prompts, new = msg
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        conn.send(time.perf_counter() - t0)


def workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    n = args.requests
    prompts = [rng.integers(3, vocab, int(k)).tolist() for k in rng.integers(args.prompt_min, args.prompt_max + 1, n)]
    budgets = rng.integers(args.short_min, args.short_max + 1, n)
    budgets[rng.choice(n, int(round(args.long_frac * n)), replace=False)] = args.long
    return prompts, budgets.astype(int)


def memory_plan(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def memory_compare(model, args) -> dict:
    """Prompt-KV bytes and XLA's memory plan: shared (engine) vs repeated (static sampler)."""
    import jax
    from flax import nnx

    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.rollout import SlotEngine
    from jaxrl_rm.rollout import step as step_mod
    from jaxrl_rm.sampling import sampler as sampler_mod

    cfg = model.config
    g, rows_p, plen, new = args.mem_g, args.mem_prompts, args.mem_prompt, args.mem_new
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.dim_per_head * np.dtype(model.dtype).itemsize
    engine = SlotEngine(model, num_slots=g * rows_p, num_prompt_slots=rows_p, max_prompt_len=plen, max_new_tokens=new,
                        host_threads=1, prefill_rows=rows_p)
    sizes = engine.cache_bytes()
    state = step_mod.init_state(model, engine.spec)
    stored = sum(x.nbytes for x in jax.tree.leaves(state.prompt_cache))
    assert stored == sizes["prompt"]
    # The static sampler: prefill [R, P] once, then jnp.repeat G times -> [R*G, kv, P, Dh] per layer.
    p_bucket = sampler_mod.bucket_length(plen)
    repeated = rows_p * g * p_bucket * per_token

    graphdef, weights = nnx.split(model)
    graph = sampler_mod._StaticGraph(graphdef, cfg)
    slots = step_mod.empty_slots((g * rows_p,))
    dec = step_mod.decode_jit.lower(graph, weights, None, state, slots, engine._stops, engine._temperature,
                                    engine._top_p, np.int32(1), np.int32(1), spec=engine.spec).compile()
    z = np.zeros((rows_p,), np.int32)
    pre = step_mod.prefill_jit.lower(graph, weights, state, np.zeros((rows_p, plen), np.int32), z + 1, z, z, z,
                                     spec=engine.spec).compile()
    engine_plan = max(memory_plan(dec), memory_plan(pre))
    mesh = make_mesh(1, 1, 1)
    jitted, a, kw = sampler_mod.generate_program(model, weights, prompts=rows_p, prompt_len=plen, num_samples=g,
                                                 max_new_tokens=new, mesh=mesh)
    static_plan = memory_plan(jitted.lower(*a, **kw).compile())
    return dict(mem_g=g, mem_prompts=rows_p, mem_prompt_len=plen, mem_new_tokens=new,
                prompt_kv_bytes_shared=int(stored), prompt_kv_bytes_repeated=int(repeated),
                prompt_kv_ratio=repeated / stored, completion_kv_bytes=int(sizes["completion"]),
                xla_plan_bytes_engine=engine_plan, xla_plan_bytes_static=static_plan,
                xla_plan_ratio=static_plan / engine_plan)


def judge_prefix_compare(model, args) -> dict:
    """Judge-like prompts sharing template + question: slot engine with / without shared prefixes
    vs the static sampler (whole-call wall time, prefill tokens, same samples)."""
    import jax

    from jaxrl_rm.rollout import SlotEngine
    from jaxrl_rm.sampling import generate

    rng = np.random.default_rng(args.seed + 1)
    vocab = model.config.vocab_size
    template = rng.integers(3, vocab, args.judge_template).tolist()
    prompts = [template + q + rng.integers(3, vocab, args.judge_response).tolist()
               for q in [rng.integers(3, vocab, args.judge_question).tolist() for _ in range(args.judge_questions)]
               for _ in range(args.judge_responses)]
    plen, new = len(prompts[0]), args.judge_new
    out = dict(judge_prompts=len(prompts), judge_prompt_len=plen, judge_new_tokens=new,
               judge_shared_tokens=args.judge_template + args.judge_question)
    results = {}
    for name, prefix in (("shared", plen - 1), ("plain", 0)):
        engine = SlotEngine(model, num_slots=len(prompts), max_prompt_len=plen, max_new_tokens=new, temperature=1.0,
                            steps_per_sync=args.steps_per_sync, max_prefix_len=prefix)
        engine.warmup()
        engine.generate(prompts, seed=0)  # warm-up
        t0 = time.perf_counter()
        res = engine.generate(prompts, seed=1)
        jax.block_until_ready(res.tokens)
        results[name] = np.asarray(res.tokens)
        out[f"judge_{name}_s"] = time.perf_counter() - t0
        out[f"judge_{name}_prefill_tokens"] = engine.stats.prefill_tokens
    generate(model, prompts, max_new_tokens=new, seed=0)  # compile
    t0 = time.perf_counter()
    res = generate(model, prompts, max_new_tokens=new, temperature=1.0, seed=1)
    jax.block_until_ready(res.tokens)
    out["judge_static_s"] = time.perf_counter() - t0
    out["judge_static_prefill_tokens"] = sum(len(p) for p in prompts)
    out["judge_shared_vs_plain"] = out["judge_plain_s"] / out["judge_shared_s"]
    out["judge_shared_vs_static"] = out["judge_static_s"] / out["judge_shared_s"]
    out["judge_prefill_ratio"] = out["judge_plain_prefill_tokens"] / out["judge_shared_prefill_tokens"]
    out["judge_same_samples"] = float(np.mean([(results["shared"] == results["plain"]).all(axis=1).mean(),
                                               (results["shared"] == np.asarray(res.tokens)).all(axis=1).mean()]))
    print(f"judge prefixes: shared {out['judge_shared_s']:.1f}s, plain {out['judge_plain_s']:.1f}s, static "
          f"{out['judge_static_s']:.1f}s; prefill tokens {out['judge_shared_prefill_tokens']} vs "
          f"{out['judge_plain_prefill_tokens']}", file=sys.stderr, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="local HF causal-LM folder (e.g. SmolLM2-135M converted by "
                         "`python -m jaxrl_rm.models.gguf --out DIR`) instead of the ~20M model")
    ap.add_argument("--quick", action="store_true", help="64 requests, long = 128, short 12..20 (a smoke run)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=64)
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--long-frac", type=float, default=0.1)
    ap.add_argument("--short-min", type=int, default=48)
    ap.add_argument("--short-max", type=int, default=80)
    ap.add_argument("--steps-per-sync", type=int, default=16)
    ap.add_argument("--mem-g", type=int, default=16)
    ap.add_argument("--mem-prompts", type=int, default=4)
    ap.add_argument("--mem-prompt", type=int, default=512)
    ap.add_argument("--mem-new", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-batches", type=int, default=1, help="static batches timed on the transformers side")
    ap.add_argument("--skip-static", action="store_true", help="time only the engine (and HF unless skipped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-questions", type=int, default=8)
    ap.add_argument("--judge-responses", type=int, default=8)
    ap.add_argument("--judge-template", type=int, default=192)
    ap.add_argument("--judge-question", type=int, default=64)
    ap.add_argument("--judge-response", type=int, default=64)
    ap.add_argument("--judge-new", type=int, default=16)
    ap.add_argument("--skip-judge", action="store_true", help="leave out the shared-prefix judge workload")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.long, args.short_min, args.short_max = 64, 128, 12, 20
        args.slots, args.prompt_max = 16, 32
        args.judge_questions, args.judge_responses, args.judge_template = 4, 4, 64

    import jax

    from jaxrl_rm.models import hf
    from jaxrl_rm.models.transformer import count_params
    from jaxrl_rm.rollout import Request, SlotEngine
    from jaxrl_rm.sampling import generate

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        worker = None
        if not args.skip_hf:
            conn, child = ctx.Pipe()
            worker = ctx.Process(target=hf_worker, args=(child, args.model or tmp, args.model is None), daemon=True)
            worker.start()
            assert conn.recv() == "ready"
        elif args.model is None:
            build_hf(tmp)
        model = hf.load_model(args.model or tmp)
    cfg = model.config
    prompts, budgets = workload(args, cfg.vocab_size)
    useful = int(budgets.sum())
    b = args.slots
    batches = [list(range(i, min(i + b, len(prompts)))) for i in range(0, len(prompts), b)]
    max_prompt = max(len(p) for p in prompts)
    out = dict(model=args.model or "random-qwen2-20M", params=int(count_params(model)), requests=len(prompts),
               slots=b, long=args.long, long_frac=args.long_frac, short=[args.short_min, args.short_max],
               prompt_len=[args.prompt_min, args.prompt_max], useful_tokens=useful,
               backend=jax.default_backend(), cores=len(os.sched_getaffinity(0)), load_avg_start=os.getloadavg()[0])

    # --- engine ---------------------------------------------------------------------------------
    engine = SlotEngine(model, num_slots=b, max_prompt_len=max_prompt, max_new_tokens=int(budgets.max()),
                        temperature=1.0, steps_per_sync=args.steps_per_sync)
    reqs = [Request(prompts[i], max_new_tokens=int(budgets[i]), seed=args.seed + k, row=j)
            for k, batch in enumerate(batches) for j, i in enumerate(batch)]
    out["engine_compile_s"] = engine.warmup()  # every program a run may use
    engine.run(reqs[:b], seed=0)  # warm-up
    t0 = time.perf_counter()
    res = engine.run(reqs, seed=0)
    jax.block_until_ready(res.tokens)
    out["engine_s"] = time.perf_counter() - t0
    st = engine.stats
    assert st.useful_tokens == useful, (st.useful_tokens, useful)
    out.update(engine_tokens_per_s=useful / out["engine_s"], engine_occupancy=st.occupancy,
               engine_decode_steps=st.decode_steps, engine_syncs=st.syncs, engine_groups=st.groups)
    eng_tokens = np.asarray(res.tokens)
    print(f"engine: {out['engine_s']:.1f}s {out['engine_tokens_per_s']:.0f} tok/s, occupancy {st.occupancy:.2f}",
          file=sys.stderr, flush=True)

    # --- static generate ------------------------------------------------------------------------
    if not args.skip_static:
        from jaxrl_rm.sampling.sampler import bucket_length

        warmed = set()
        static_s, same, per_batch = 0.0, 0, []
        for k, batch in enumerate(batches):
            new = int(budgets[batch].max())
            bkt = (bucket_length(new), len(batch), bucket_length(max(len(prompts[i]) for i in batch)))
            if bkt not in warmed:  # compile outside the timing (the smallest budget of the same bucket)
                generate(model, [prompts[i] for i in batch], max_new_tokens=max(1, bkt[0] // 2 + 1), seed=0)
                warmed.add(bkt)
            t0 = time.perf_counter()
            r = generate(model, [prompts[i] for i in batch], max_new_tokens=new, temperature=1.0, seed=args.seed + k)
            toks = np.asarray(r.tokens)
            per_batch.append(time.perf_counter() - t0)
            static_s += per_batch[-1]
            same += sum(int((toks[j, :budgets[i]] == eng_tokens[i, :budgets[i]]).all()) for j, i in enumerate(batch))
        out.update(static_s=static_s, static_tokens_per_s=useful / static_s,
                   engine_vs_static=out["engine_tokens_per_s"] / (useful / static_s),
                   same_samples=same / len(prompts))
        print(f"static: {static_s:.1f}s {out['static_tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    # --- transformers ---------------------------------------------------------------------------
    if worker is not None:  # the first --hf-batches static batches (torch is slow here)
        conn.send(([prompts[0]], 2))
        conn.recv()  # warm-up
        hf_s, hf_useful = 0.0, 0
        for batch in batches[:args.hf_batches]:
            conn.send(([prompts[i] for i in batch], int(budgets[batch].max())))
            hf_s += conn.recv()
            hf_useful += int(budgets[batch].sum())
        conn.send(None)
        worker.join()
        out.update(hf_batches=min(args.hf_batches, len(batches)), hf_s=hf_s, hf_tokens_per_s=hf_useful / hf_s,
                   engine_vs_hf=out["engine_tokens_per_s"] / (hf_useful / hf_s))
        if not args.skip_static:  # the static sampler on the same batches, for reference
            out["static_tokens_per_s_on_hf_batches"] = hf_useful / sum(per_batch[:args.hf_batches])

    # --- judge prompts with shared prefixes -----------------------------------------------------
    if not args.skip_judge:
        out.update(judge_prefix_compare(model, args))

    # --- memory ---------------------------------------------------------------------------------
    if args.quick:
        args.mem_prompt, args.mem_new = min(args.mem_prompt, 128), min(args.mem_new, 32)
    out["load_avg_end"] = os.getloadavg()[0]
    out.update(memory_compare(model, args))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

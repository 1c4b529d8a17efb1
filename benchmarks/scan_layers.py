"""Layer layouts and remat: compile time and per-chip memory of an SFT train step, by depth.

What is measured (one run, this machine): for every (layers, layout, remat) asked for, the jitted
SFT train step every trainer uses (`build_train_step(Trainer, next_token_loss)`: forward,
backward, global-norm clip, AdamW; state donated) is lowered and compiled for shapes only
(`jaxrl_rm.parallel.aot.compile_report`, nothing allocated) and we report:
  * `compile_s`: lowering + compilation wall time (the machine is shared: `load_avg_1min` is
    printed beside it);
  * `temp_gib`: XLA's temporaries per chip (activations saved for the backward, scratch);
    `peak_gib`: temporaries + arguments + outputs - donated (the chip's live memory for the call).
Targets: `--target cpu` (XLA:CPU, one device) or `--target v5p:2x2x1` (any TPU topology; needs
libtpu, run with JAX_PLATFORMS=cpu; compiled for one chip of it, mesh (1, 1, 1)).
Models: `--model small` (hidden 256, SwiGLU 768, 4 / 2 heads, vocab 4096, untied) or
`--model qwen2.5-1.5b` (hidden 1536, SwiGLU 8960, 12 / 2 heads of 128, vocab 151936, tied, q/k/v
bias), in `--dtype` compute / `--param-dtype` storage.
With `--run-steps N` (CPU only) each configuration also runs N steps on random weights and
reports the median step time (`step_s`) after one warm-up step.

Prints one JSON object as the last line.

    python benchmarks/scan_layers.py --target cpu --layers 4 28 --remat none full dots_saveable
    JAX_PLATFORMS=cpu python benchmarks/scan_layers.py --target v5p:2x2x1 --model qwen2.5-1.5b \\
        --batch 1 --length 4096 --layers 4 28 --layouts scanned --remat none full
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_rm.config import OptimConfig
from jaxrl_rm.models.config import ModelConfig, as_dtype
from jaxrl_rm.models.transformer import REMAT_POLICIES, Transformer
from jaxrl_rm.parallel import aot
from jaxrl_rm.parallel.rules import batch_sharding, param_shardings
from jaxrl_rm.train.sft import next_token_loss
from jaxrl_rm.train.state import Trainer, build_train_step, make_optimizer

MODELS = {
    "small": dict(model_type="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=768,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1000000.0),
}
GIB = 2**30


def abstract_state(model, optimizer, mesh) -> dict:
    """`Trainer.init_state`'s pytree as placed `ShapeDtypeStruct`s (nothing allocated)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shardings = param_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    replicated = NamedSharding(mesh, P())
    opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       jax.eval_shape(optimizer.init, params))
    return {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}


def measure(config, *, layout, remat, mesh, batch, length, dtype, param_dtype, run_steps):
    kw = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=layout == "scanned", remat=remat)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), **kw))
    optimizer = make_optimizer(OptimConfig(warmup_steps=0), 100)
    state = abstract_state(model, optimizer, mesh)
    trainer = Trainer(nnx.graphdef(model), optimizer, mesh, state_sharding=jax.tree.map(lambda x: x.sharding, state))
    step = build_train_step(trainer, lambda m, b: next_token_loss(m, b, mesh=mesh))
    rows = {k: jax.ShapeDtypeStruct((batch, length), d, sharding=batch_sharding(mesh, 2))
            for k, d in (("input_ids", jnp.int32), ("attention_mask", jnp.bool_), ("loss_mask", jnp.bool_))}
    load = os.getloadavg()[0]
    rep = aot.compile_report(step, state, rows)
    out = dict(layers=config.num_hidden_layers, layout=layout, remat=remat, compile_s=round(rep.compile_seconds, 2),
               temp_gib=round(rep.temp_bytes / GIB, 4), peak_gib=round(rep.peak_bytes / GIB, 4),
               load_avg_1min=round(load, 1))
    if run_steps:
        real = Transformer(config, rngs=nnx.Rngs(0), **kw)
        trainer = Trainer(nnx.graphdef(real), optimizer, mesh)
        st = trainer.init_state(real, 0)
        del real
        fn = build_train_step(trainer, lambda m, b: next_token_loss(m, b, mesh=mesh))
        ids = np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)).astype(np.int32)
        data = {"input_ids": ids, "attention_mask": np.ones(ids.shape, bool), "loss_mask": np.ones(ids.shape, bool)}
        times = []
        for i in range(run_steps + 1):
            t0 = time.perf_counter()
            st, metrics = fn(st, data)
            jax.block_until_ready(metrics["loss"])
            if i:
                times.append(time.perf_counter() - t0)
        out.update(step_s=round(statistics.median(times), 4), loss=round(float(metrics["loss"]), 5))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu", help="cpu, or a TPU topology such as v5p:2x2x1")
    ap.add_argument("--model", default="small", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 28])
    ap.add_argument("--layouts", nargs="+", default=["unrolled", "scanned"], choices=["unrolled", "scanned"])
    ap.add_argument("--remat", nargs="+", default=["none", "full", "dots_saveable"], choices=REMAT_POLICIES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--run-steps", type=int, default=0, help="CPU: also time this many steps")
    args = ap.parse_args()

    if args.target == "cpu":
        from jaxrl_rm.parallel.mesh import make_mesh

        mesh, device = make_mesh(1, 1, 1, devices=jax.devices()[:1]), jax.devices()[0].device_kind
    else:
        if args.run_steps:
            ap.error("--run-steps needs --target cpu")
        mesh, device = aot.tpu_mesh(args.target, (1, 1, 1)), args.target
    results = []
    for layers in args.layers:
        config = ModelConfig.for_family(**{**MODELS[args.model], "num_hidden_layers": layers})
        for layout in args.layouts:
            for remat in args.remat:
                r = measure(config, layout=layout, remat=remat, mesh=mesh, batch=args.batch, length=args.length,
                            dtype=as_dtype(args.dtype), param_dtype=as_dtype(args.param_dtype),
                            run_steps=args.run_steps)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(json.dumps(dict(benchmark="scan_layers", target=args.target, device=str(device), model=args.model,
                          batch=args.batch, length=args.length, dtype=args.dtype, param_dtype=args.param_dtype,
                          step="build_train_step(next_token_loss), AdamW, 1 chip", results=results)))


if __name__ == "__main__":
    main()

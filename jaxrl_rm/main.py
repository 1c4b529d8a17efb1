"""Command line: `python -m jaxrl_rm.main [--config configs/x.yaml] [key=value ...]`.

Without `--config` the built-in defaults run (a tiny model on a synthetic task, CPU-sized).
`--plan TOPOLOGY` compiles the config's steps for a TPU slice instead of running them
(`jaxrl_rm.plan`).
`key=value` overrides any config field by its dotted path, e.g. `optim.learning_rate=3e-4
run_dir=/tmp/r mesh.tensor=2`; values are parsed as YAML and type-checked.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxrl_rm.configlib import ConfigError, describe


#: task -> "module:function"; a runner takes the Config and returns the summary dict. Imported
#: only for the task being run, so `--help` and config errors stay fast.
PIPELINES = {
    "sft": "jaxrl_rm.train.sft:run_sft",
    "grpo": "jaxrl_rm.train.grpo:run_grpo",
    "rm_bt": "jaxrl_rm.train.reward_model:run_reward_model",
    "polar_pretrain": "jaxrl_rm.train.reward_model:run_reward_model",
    "polar_finetune": "jaxrl_rm.train.reward_model:run_reward_model",
    "polar_data": "jaxrl_rm.train.polar_data:run_polar_data",
    "judge_j1": "jaxrl_rm.train.judge:run_judge_j1",
    "pipeline": "jaxrl_rm.train.pipeline:run_pipeline",
}


def pipeline(task: str):
    import importlib

    module, function = PIPELINES[task].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser() -> argparse.ArgumentParser:
    from jaxrl_rm.config import Config

    keys = "\n".join("  " + line for line in describe(Config))
    return argparse.ArgumentParser(
        prog="python -m jaxrl_rm.main",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="Output: <run_dir>/config.yaml, metrics.jsonl, tensorboard/, summary.json, checkpoints/.\n\n"
               "Config keys (key (type) = default  doc):\n" + keys,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--config", help="YAML config file (may `extends:` a base file)")
    parser.add_argument("--plan", metavar="TOPOLOGY",
                        help="compile every step of the config for a TPU topology (e.g. v5e:2x4, v5p:2x2x2) "
                             "and print per-chip memory against HBM; runs nothing (needs libtpu: the "
                             "tpu-aot extra); exit 1 when a step does not fit")
    parser.add_argument("--plan-steps", metavar="PATTERN,...",
                        help="with --plan: compile only the steps whose names match these fnmatch "
                             "patterns (e.g. grpo/train_step,*/rollout)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    from jaxrl_rm.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plan:
        import jax

        # compile for the topology's abstract chips from this host's CPU backend: never claim a
        # local accelerator (a TPU VM's chips may be busy training)
        jax.config.update("jax_platforms", "cpu")
        from jaxrl_rm.plan import run_plan

        try:
            steps = [p for p in args.plan_steps.split(",") if p] if args.plan_steps else None
            return run_plan(cfg, args.plan, steps)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    from jaxrl_rm.parallel.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(cfg.distributed)
    try:
        summary = pipeline(cfg.task)(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

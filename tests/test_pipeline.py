"""task: pipeline — stages chained through {run_dir}, skipped when done, compared at the end."""

import json

from jaxrl_rm.main import main

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1", "data.max_length=16",
        "data.synthetic_size=128", "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false",
        "grpo.eval_size=8", "grpo.max_new_tokens=4", "train.steps=3"]


def test_pipeline_chains_stages_and_compares(tmp_path):
    stages = [{"name": "a", "overrides": TINY},
              {"name": "b", "overrides": TINY + ["model.path={run_dir}/a/hf", "optim.learning_rate=0.01"]}]
    args = ["task=pipeline", f"run_dir={tmp_path}", f"stages={json.dumps(stages)}", "compare=[a, b]",
            "compare_metrics=[loss, accuracy]"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"] == ["a", "b"] and "a/accuracy_gain" in summary and "b/eval_loss_after" in summary
    b_cfg = (tmp_path / "b" / "config.yaml").read_text()
    assert f"path: {tmp_path}/a/hf" in b_cfg  # {run_dir} resolved: stage b started from a's export
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    results = (tmp_path / "results.md").read_text()
    assert "| a | accuracy |" in results and "| b | accuracy |" in results
    assert (tmp_path / "report" / "report.md").exists()
    # rerun: finished stages are skipped (their summaries are reused, nothing retrains)
    mtime = (tmp_path / "a" / "summary.json").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "a" / "summary.json").stat().st_mtime == mtime


def test_claims_table_compares_summary_keys():
    import pytest

    from jaxrl_rm.config import ClaimSpec, load_config
    from jaxrl_rm.configlib import ConfigError
    from jaxrl_rm.train.pipeline import claims_table

    summary = {"a/acc_gain": 0.2, "b/acc_gain": 0.1, "a1/acc_gain": 0.0, "b1/acc_gain": 0.3, "c/loss": 1.0}
    claims = [ClaimSpec(claim="A beats B", paper="P1", metric="gain", ours=["a/acc_gain", "a1/acc_gain"],
                        baseline=["b/acc_gain", "b1/acc_gain"]),
              ClaimSpec(claim="A beats B", paper="P1", metric="gain", ours=["a/acc_gain"], baseline=["b/acc_gain"]),
              ClaimSpec(claim="lower loss", paper="P2", metric="loss", ours=["c/loss"], baseline=["d/loss"],
                        direction="lower"),
              ClaimSpec(claim="margin", paper="P3", metric="gain", ours=["a/acc_gain"], baseline=["b/acc_gain"],
                        margin=0.5),
              ClaimSpec(claim="matches or beats", paper="P4", metric="gain", ours=["b/acc_gain"],
                        baseline=["a/acc_gain"], margin=-0.15)]
    rows = claims_table(claims, summary).splitlines()[2:]
    assert "| 0.100 | 0.200 | higher | no | seed 0 |" in rows[0]  # averaged over the listed keys
    assert "| 0.200 | 0.100 | higher | yes | seed 0 |" in rows[1]
    assert "| - | - | lower | not run |" in rows[2]
    assert "| higher (by > 0.5) | no |" in rows[3]
    assert "| 0.100 | 0.200 | higher or within 0.15 | yes |" in rows[4]  # trails by 0.1 < 0.15
    with pytest.raises(ConfigError, match=r"claims\[0\].ours"):
        load_config(None, ["task=pipeline", "claims=[{claim: x}]"])


def test_rerunning_a_finished_claims_pipeline_rewrites_results(tmp_path):
    """A finished stage is skipped on rerun; results.md then holds one claims table, not two."""
    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "a" / "summary.json").write_text(json.dumps({"acc_after": 0.6, "acc_before": 0.4}))
    args = ["task=pipeline", f"run_dir={run}", "stages=[{name: a, config: ''}]",  # built-in defaults
            "claims=[{claim: c, ours: [a/acc_after], baseline: [a/acc_before]}]"]
    for _ in range(2):
        assert main(args) == 0
    text = (run / "results.md").read_text()
    assert text.count("## Claims") == 1 and "| 0.600 | 0.400 | higher | yes |" in text


def test_claims_over_seeds_show_means_ranges_and_agreement():
    """Per-seed values (`<key>/seeds`) give each side's mean (min–max) and the verdict on the means
    with the number of seeds that agree; a key without seeds counts the same in every seed."""
    from jaxrl_rm.config import ClaimSpec
    from jaxrl_rm.train.pipeline import claims_table

    summary = {"a/acc": 0.5, "a/acc/seeds": {"0": 0.7, "1": 0.2, "2": 0.6},
               "b/acc": 0.3, "b/acc/seeds": {"0": 0.3, "1": 0.3, "2": 0.3}, "c/acc": 0.1}
    rows = claims_table([ClaimSpec(claim="a beats b", ours=["a/acc"], baseline=["b/acc"], margin=0.03),
                         ClaimSpec(claim="a beats c", ours=["a/acc"], baseline=["c/acc"]),
                         ClaimSpec(claim="c beats b", ours=["c/acc"], baseline=["b/acc"])], summary).splitlines()[2:]
    assert "| 0.500 (0.200–0.700) | 0.300 (0.300–0.300) | higher (by > 0.03) | yes (2/3 seeds) | seeds 0, 1, 2 |" in rows[0]
    assert "| 0.500 (0.200–0.700) | 0.100 (0.100–0.100) | higher | yes (3/3 seeds) |" in rows[1]
    assert "| no (0/3 seeds) |" in rows[2]


def test_pipeline_over_seeds(tmp_path):
    """`seeds`: every stage runs once per seed in `seed<k>/` at that seed, `{run_dir}` names the
    seed's folder, and the summary holds means and per-seed values; claims compare the means."""
    import pytest

    from jaxrl_rm.configlib import ConfigError
    from jaxrl_rm.config import load_config

    stages = [{"name": "a", "overrides": TINY},
              {"name": "b", "overrides": TINY + ["model.path={run_dir}/a/hf"]}]
    args = ["task=pipeline", f"run_dir={tmp_path}", f"stages={json.dumps(stages)}", "seeds=[3, 4]",
            "compare=[a, b]", "claims=[{claim: b after a, ours: [b/accuracy_after], baseline: [a/accuracy_before]}]"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [3, 4]
    for k in (3, 4):
        b_cfg = load_config(tmp_path / f"seed{k}" / "b" / "config.yaml")
        assert b_cfg.seed == k and b_cfg.model.path == f"{tmp_path}/seed{k}/a/hf"
        assert (tmp_path / f"seed{k}" / "comparison.png").exists()
    per_seed = summary["b/eval_loss_after/seeds"]
    assert set(per_seed) == {"3", "4"} and summary["b/eval_loss_after"] == pytest.approx(sum(per_seed.values()) / 2)
    assert per_seed["3"] != per_seed["4"]  # the seed reached the stages
    results = (tmp_path / "results.md").read_text()
    assert "gain per seed" in results and "| seeds 3, 4 |" in summary["claims_table"]
    # a stage's own seed override wins over the pipeline's
    stage = load_config(None, args[:3] + ["seed=7"]).stages[0]
    from jaxrl_rm.train.pipeline import stage_config

    assert stage_config(load_config(None, ["task=pipeline", "seed=7"]), stage).seed == 7
    assert stage_config(load_config(None, ["task=pipeline", "seed=7"]),
                        dataclasses_replace(stage, overrides=["seed=1"])).seed == 1
    with pytest.raises(ConfigError, match="seeds"):
        load_config(None, ["task=pipeline", "seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="seeds"):
        load_config(None, ["task=sft", "seeds=[1, 2]"])


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_claims_over_one_seed_read_like_one_run():
    from jaxrl_rm.config import ClaimSpec
    from jaxrl_rm.train.pipeline import claims_table

    summary = {"a/acc": 0.5, "a/acc/seeds": {"4": 0.5}, "b/acc": 0.3, "b/acc/seeds": {"4": 0.3}}
    row = claims_table([ClaimSpec(claim="a beats b", ours=["a/acc"], baseline=["b/acc"])], summary).splitlines()[2]
    assert row.endswith("| 0.500 | 0.300 | higher | yes | seed 4 |")

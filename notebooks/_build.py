"""Write the notebooks in this folder from the cell sources below (no outputs, stable cell ids).

    python notebooks/_build.py            # (re)write notebooks/NN_*.ipynb
    python notebooks/_build.py --check    # exit 1 if a notebook differs from its source here

Edit the cells here, not in Jupyter, and regenerate: the .ipynb files are committed without
outputs, so a diff of this file is the review. Every notebook reads `JAXRL_RM_NOTEBOOK_TINY=1`
(CI: tiny step counts, a few minutes for all four; `tests/test_notebooks.py`) and writes its runs
under `$JAXRL_RM_NOTEBOOK_DIR` (default `runs/notebooks/`, relative to the kernel's working
directory) in a `tiny/` or `full/` subfolder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


class Notebook:
    def __init__(self, name: str):
        self.name, self.cells = name, []

    def md(self, text: str) -> None:
        self.cells.append(("markdown", text))

    def code(self, text: str) -> None:
        self.cells.append(("code", text))

    def build(self) -> nbformat.NotebookNode:
        cells = []
        for i, (kind, text) in enumerate(self.cells):
            source = text.strip("\n")
            cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
            cell["id"] = f"{self.name[:2]}-{i:02d}"
            cells.append(cell)
        nb = nbformat.v4.new_notebook(cells=cells)
        nb["metadata"] = {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
        nbformat.validate(nb)
        return nb


def setup_cell(name: str) -> str:
    """The first code cell of every notebook: mode, paths, plotting."""
    return f'''
import os
from pathlib import Path

import jaxrl_rm

# JAXRL_RM_NOTEBOOK_TINY=1: tiny step counts (CI); unset: the settings the prose talks about.
TINY = os.environ.get("JAXRL_RM_NOTEBOOK_TINY", "0").lower() not in ("", "0", "false", "no")
REPO = Path(jaxrl_rm.__file__).resolve().parent.parent   # the checkout (configs/ lives here)
CONFIGS = REPO / "configs"
WORK = Path(os.environ.get("JAXRL_RM_NOTEBOOK_DIR", "runs/notebooks")).resolve() / ("tiny" if TINY else "full") / "{name}"
WORK.mkdir(parents=True, exist_ok=True)
SHARED_DATA = Path(os.environ.get("JAXRL_RM_SHARED_DATA", REPO.parent / "shared" / "data"))  # optional real data

%matplotlib inline
import matplotlib.pyplot as plt

print(f"tiny={{TINY}}\\nrepo={{REPO}}\\noutputs in {{WORK}}")
'''


def table_helper() -> str:
    return r'''
from IPython.display import Markdown, display


def show_table(header, rows, fmt="{:.3f}"):
    # Display rows as a Markdown table (floats formatted with `fmt`).
    cell = lambda v: fmt.format(v) if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", "⏎")
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))
'''


NOTEBOOKS: list[Notebook] = []


def notebook(name: str) -> Notebook:
    nb = Notebook(name)
    NOTEBOOKS.append(nb)
    return nb


# =====================================================================================================
# 01 quickstart
# =====================================================================================================
nb = notebook("01_quickstart")
nb.md(r"""
# 01 · Quickstart: model → samples → verifier → one GRPO step

The whole library is *sample → score → update*. This notebook walks through it once, by hand:

1. load a causal LM from a **local Hugging Face directory** (`config.json` + `*.safetensors` + tokenizer;
   nothing is downloaded),
2. **sample** completions with the jitted KV-cache sampler,
3. **score** them with a rule **verifier**,
4. take **one GRPO step** — look at the rewards, the group-relative advantages and the update metrics —
   then a few more, and **plot** them.

It runs on a laptop CPU. With `JAXRL_RM_NOTEBOOK_TINY=1` (what CI sets) it takes fewer steps.
To try your own checkpoint, set `JAXRL_RM_MODEL_DIR=/path/to/a/Qwen2-Qwen3-or-Llama-3-directory`
before starting Jupyter (sampling works on CPU for small models; the GRPO part gets slow beyond a
few hundred million parameters).
""")
nb.code(setup_cell("01_quickstart"))
nb.code(table_helper())
nb.md(r"""
## 1. A model from a local HF directory

`jaxrl_rm.models.hf.load_model(path)` reads a Llama-3 / Qwen2 / Qwen3 checkpoint into a Flax NNX
`Transformer`; `save_model(model, path, tokenizer=tok)` writes one back (loadable by
`transformers.AutoModelForCausalLM.from_pretrained`). So that this notebook needs no download, we
*write* a directory first: a random-weight tiny Qwen2 with the library's character-level tokenizer
(`build_char_tokenizer`: one token per character, a real `transformers` fast tokenizer with a chat
template). Everything below only uses `MODEL_DIR`.
""")
nb.code(r"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.models import hf
from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.transformer import Transformer

MODEL_DIR = os.environ.get("JAXRL_RM_MODEL_DIR", "")
if not MODEL_DIR:
    char_tok = build_char_tokenizer()
    config = ModelConfig.for_family(
        "qwen2", vocab_size=len(char_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=char_tok.bos_token_id, eos_token_id=char_tok.eos_token_id, pad_token_id=char_tok.pad_token_id)
    MODEL_DIR = str(hf.save_model(Transformer(config, rngs=nnx.Rngs(0)), WORK / "tiny-qwen2", tokenizer=char_tok))

print(MODEL_DIR)
print(sorted(p.name for p in Path(MODEL_DIR).iterdir()))
hf_config = json.loads((Path(MODEL_DIR) / "config.json").read_text())
print({k: hf_config[k] for k in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size")})
""")
nb.md(r"""
Loading is one call each. `hf.load_tokenizer` reads the directory's `tokenizer.json` exactly as
saved (falling back to `AutoTokenizer` with local files only): transformers 5's `AutoTokenizer` would
re-derive the model family's tokenizer class from `config.json`, which silently changes a custom
tokenizer such as the character one (it would drop spaces) — the round trip below checks it.
""")
nb.code(r"""
model = hf.load_model(MODEL_DIR)          # -> jaxrl_rm.models.transformer.Transformer
tokenizer = hf.load_tokenizer(MODEL_DIR)  # a transformers tokenizer, with the chat template saved beside it

print(type(model).__name__, f"{model.config.num_params():,} parameters", model.config.model_type)
text = "reverse: ab cd"
print(type(tokenizer).__name__, "round trip:", repr(tokenizer.decode(tokenizer(text).input_ids)))

# A forward pass: int32 ids [B, T] -> float32 logits [B, T, V].
ids = jnp.asarray([tokenizer("reverse:abc=").input_ids], jnp.int32)
logits = model(ids)
probs = np.asarray(jax.nn.softmax(logits[0, -1]))
print("logits", logits.shape, logits.dtype)
print("next-token top 5:", [(tokenizer.convert_ids_to_tokens(int(i)), round(float(probs[i]), 3))
                            for i in np.argsort(-probs)[:5]])
""")
nb.md(r"""
## 2. Sampling

`generate_text` renders prompts (here through the tokenizer's chat template, exactly as the trainers
do), samples `num_samples` completions per prompt with temperature / top-k / top-p, stops at the
eos token and decodes. `out.result` keeps the token ids, the mask and the **sampler's log-probs** of
every token — GRPO reuses them as the old-policy log-probs. The prompts come from the library's
synthetic "miniature world": string reversal (`reverse:abcd=` → `dcba`), with held-out strings
disjoint from the training strings.
""")
nb.code(r"""
from jaxrl_rm.data import synthetic
from jaxrl_rm.sampling import generate_text

problems = synthetic.reverse_problems(4, seed=0, split="eval")
G = 4
out = generate_text(model, tokenizer, [p.prompt for p in problems], chat_template=True,
                    num_samples=G, max_new_tokens=8, temperature=1.0, seed=0)
print("rendered prompt:", repr(out.prompt_texts[0]))
show_table(["prompt", "gold", f"{G} samples"],
           [[p.prompt, p.answer, " · ".join(repr(c) for c in group)] for p, group in zip(problems, out.grouped())])

res = out.result
print("tokens", res.tokens.shape, "| finish reasons", res.finish_reason[:G].tolist(),
      "| sequence log-probs", np.round(np.asarray(res.logprobs.sum(-1))[:G], 2))
greedy = generate_text(model, tokenizer, [p.prompt for p in problems], chat_template=True,
                       max_new_tokens=8, greedy=True)
print("greedy:", greedy.texts)
""")
nb.md(r"""
## 3. Scoring with a verifier

Verifiers turn a completion and a gold answer into a reward, in three steps: **guards** (empty,
master-key such as `":"`, repetition and prompt-echo answers earn nothing), **answer extraction**
(`#### 18`, `\boxed{…}`, `The answer is …`, `A: …`; the last marker wins) and **comparison** —
`ExactMatchVerifier` after normalisation, `MathVerifier` with `math-verify` (numbers, fractions,
LaTeX). A random policy earns nothing on string reversal, as expected:
""")
nb.code(r"""
from jaxrl_rm.rewards import ExactMatchVerifier, MathVerifier

completions = out.texts                                     # row i*G + j: sample j of prompt i
golds = [p.answer for p in problems for _ in range(G)]
scored = ExactMatchVerifier()(completions, golds, prompts=[p.prompt for p in problems for _ in range(G)])
print("exact-match rewards:", scored.rewards.reshape(len(problems), G).tolist())
print("reasons:", sorted({r.reason for r in scored.results}))

# MathVerifier on hand-written answers: what earns a reward and why.
texts = ["She sells 16 - 3 - 4 = 9 eggs and earns 9 * 2 = $18.\n#### 18",
         r"So the probability is \boxed{\frac{1}{2}}.",
         "The answer is 0.5.",
         "A: 17",
         ":",
         "18 18 18 18 18 18 18 18",
         ""]
math_golds = ["18", "0.5", "1/2", "18", "18", "18", "18"]
with MathVerifier(backend="inline") as math_verifier:
    checked = math_verifier(texts, math_golds)
show_table(["response", "gold", "reward", "reason", "extracted"],
           [[t, g, float(r), v.reason, v.answer] for t, g, r, v in zip(texts, math_golds, checked.rewards, checked.results)])
""")
nb.md(r"""
## 4. One GRPO step, dissected

`GRPO(cfg)` holds a run's pieces: the policy (from `model.path`), the task mixture, the reward
sources and the jitted update. One RL step is `collect` (draw B prompts, sample G completions each,
score them) → `build_batch` (group-relative advantages, padded training rows) → the clipped
policy-gradient update. `run_step(state, step)` does all three; we first call the pieces ourselves.

Reward sources are pluggable: anything with a `name` and `__call__(rollouts) -> (rewards [B, G], metrics)`
registered under a type name can be used in a config. Because a random policy never reverses a string,
we add a toy *shaping* reward — the share of characters from the task's alphabet — so the advantages
are not all zero and the plots below show learning. The verifier stays in the mix.
""")
nb.code(r"""
from jaxrl_rm.config import load_config
from jaxrl_rm.rewards import sources
from jaxrl_rm.train.grpo import GRPO


class AlphabetShare:
    # Toy shaping reward: the share of completion characters that come from the task's alphabet (a-h).
    name = "alphabet"

    def __call__(self, rollouts):
        share = [[sum(ch in "abcdefgh" for ch in text) / max(len(text), 1) for text in group]
                 for group in rollouts.completions]
        return np.asarray(share, np.float32), {}


sources.register("alphabet_share", lambda spec, ctx: AlphabetShare())

B, G, STEPS = 8, 8, (4 if TINY else 40)
cfg = load_config(None, [
    "task=grpo", f"run_dir={WORK / 'grpo'}", f"model.path={MODEL_DIR}", f"train.steps={STEPS}",
    f"grpo.prompts_per_step={B}", f"grpo.num_samples={G}", "grpo.max_prompt_length=24", "grpo.max_new_tokens=8",
    "grpo.eval_size=32", "data.synthetic_size=512",
    "optim.learning_rate=3e-3", "optim.schedule=constant", "optim.warmup_steps=0",
    "grpo.tasks=[{name: reverse, data: 'synthetic:reverse', "
    "rewards: [{type: exact_match}, {type: alphabet_share, weight: 0.5}]}]",
])
rl = GRPO(cfg)
state = rl.state   # {"params", "opt_state", "step", ...}; run_step donates it and returns the next one

parts, kept, sample_metrics = rl.collect(state["params"], step=0)
rollouts, result, prompt_ids, rewards, live = parts[0]
show_table(["prompt", "completion", "reward"],
           [[rollouts.items[i].prompt if j == 0 else "", repr(rollouts.completions[i][j]), float(rewards[i, j])]
            for i in range(2) for j in range(G)])
batch, batch_metrics = rl.build_batch(parts, kept)
advantages = batch["advantages"].reshape(B, G)
for key, value in batch.items():                 # B*G training rows, prompt left-padded to P, completion T
    print(f"{key:15} {tuple(value.shape)} {value.dtype}")
""")
nb.md(r"""
The advantage of a completion is its reward minus its group's mean, divided by the group's standard
deviation (`grpo.advantage: grpo`; `drgrpo` drops the division, `rloo` leaves the sample out). A group
whose G rewards are all equal teaches nothing (zero advantages) — DAPO's dynamic sampling
(`grpo.dynamic_sampling`) replaces such groups.
""")
nb.code(r"""
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, values, title in [(axes[0], rewards, "rewards [B, G]"), (axes[1], advantages, "advantages [B, G]")]:
    im = ax.imshow(values, cmap="coolwarm" if "adv" in title else "viridis", aspect="auto")
    ax.set(title=title, xlabel="sample j", ylabel="prompt i")
    fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()
""")
nb.md(r"""
Now the update. `run_step` repeats the collection above (sampling seeds are a function of
`(seed, step)`, so it draws the same samples), computes the clipped surrogate loss on the batch and
applies one optimizer step. Its metrics are what a run logs to `metrics.jsonl`.
""")
nb.code(r"""
state, metrics, tokens = rl.run_step(state, 0)
keys = ["reward_mean", "reward_std", "zero_variance_fraction", "loss", "pg_loss", "grad_norm",
        "clip_frac_low", "clip_frac_high", "approx_kl", "sampler_logp_gap", "response_length"]
show_table(["metric", "value"], [[k, float(metrics[k])] for k in keys if k in metrics], fmt="{:.4g}")
print("sample hash (what was sampled, for resume checks):", metrics["sample_hash"], "| tokens:", tokens)
""")
nb.md(r"""
## 5. A few more steps, and plots

The same call in a loop is a (minimal) training run. The shaping reward climbs first — it is easy;
exact reversals need the SFT warm-up and many more steps (`configs/rlvr_tiny.yaml`, notebook 04).
""")
nb.code(r"""
history = [metrics]
for step in range(1, STEPS):
    state, metrics, _ = rl.run_step(state, step)
    history.append(metrics)

series = {k: [h.get(k, np.nan) for h in history] for k in
          ["reward_mean", "reward/reverse/alphabet/mean", "reward/reverse/verifier_exact/mean", "loss",
           "grad_norm", "response_length"]}
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for key in ["reward_mean", "reward/reverse/alphabet/mean", "reward/reverse/verifier_exact/mean"]:
    axes[0].plot(range(1, STEPS + 1), series[key], marker="o", label=key)
axes[0].set(title="rewards", xlabel="step")
axes[0].legend(fontsize=8)
axes[1].plot(range(1, STEPS + 1), series["loss"], marker="o", label="loss")
axes[1].plot(range(1, STEPS + 1), series["grad_norm"], marker="o", label="grad_norm")
axes[1].set(title="update", xlabel="step")
axes[1].legend(fontsize=8)
last_parts, _, _ = rl.collect(state["params"], step=STEPS)
before, after = np.asarray(rewards).ravel(), np.concatenate([p[3].ravel() for p in last_parts])
bins = np.linspace(0, max(before.max(), after.max(), 1e-3), 16)
axes[2].hist(before, bins=bins, alpha=0.6, label="step 1 (collected above)")
axes[2].hist(after, bins=bins, alpha=0.6, label="after training")
axes[2].set(title="reward distribution", xlabel="reward")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

print("held-out greedy accuracy:", rl.evaluate(state))
""")
nb.md(r"""
## 6. Export, and the same as a command

The trained policy is an HF directory again (`export_hf` gathers sharded weights and writes on
process 0), loadable by `hf.load_model` and by `transformers`:
""")
nb.code(r"""
from jaxrl_rm.train.state import export_hf

export_hf(rl.trainer, state["params"], WORK / "policy", rl.tokenizer)
reloaded = hf.load_model(WORK / "policy")
same = jnp.allclose(reloaded(ids), nnx.merge(rl.trainer.graphdef, state["params"])(ids), atol=1e-5)
print(sorted(p.name for p in (WORK / "policy").iterdir()), "| reloaded logits match:", bool(same))
""")
nb.md(r"""
As a command, a run does all of the above plus checkpoints (resumable, SIGTERM-safe), evaluation,
`metrics.jsonl`, TensorBoard and `summary.json`:

```bash
python -m jaxrl_rm.main --config configs/rlvr_tiny.yaml                  # SFT warm-up, then GRPO with a verifier
python -m jaxrl_rm.main --config configs/rlvr_tiny.yaml model.path=/path/to/hf-dir warmup.steps=0
python -m jaxrl_rm.main --help                                           # every key, with its default
```

From Python the same is `jaxrl_rm.main.main(["--config", "configs/rlvr_tiny.yaml", "run_dir=runs/x"])`.
Next: `02_reward_models.ipynb` (BT and POLAR reward models), `03_judges.ipynb` (LM judges),
`04_grpo.ipynb` (RLVR vs RLLM vs URPO curves from run directories).
""")


# =====================================================================================================
# 02 reward models
# =====================================================================================================
nb = notebook("02_reward_models")
nb.md(r"""
# 02 · Reward models: Bradley–Terry and POLAR

Two scalar reward models, one pipeline (`jaxrl_rm.train.reward_model`): a decoder backbone with a
linear head on one token, trained with the Bradley–Terry loss −log σ(r⁺ − r⁻).

* **Bradley–Terry (BT)** — `r(prompt, response)`, trained on preference pairs (chosen ≻ rejected).
* **POLAR** (policy-discriminative learning) — `r(prompt, reference, candidate)`: *how likely is it
  that the candidate comes from the same policy as the reference?* The input is
  `prompt + reference <|split|> prompt + candidate <|reward|>`. **Pretraining** needs no labels:
  for two policies A ≠ B, r(p, a₁, a₂) should beat r(p, a₁, b₁). **Fine-tuning** on ranked triples
  (reference ≻ chosen ≻ rejected) turns "same policy" into "close to the reference".

Everything here runs on the library's *miniature world*: a pool of 256 synthetic "style" policies
(each writes answers with its own letters, separator, casing and lengths), small enough to train a
300k-parameter RM on a CPU in a minute. Section 6 shows how to point the same commands at real data.
""")
nb.code(setup_cell("02_reward_models"))
nb.code(table_helper())
nb.md(r"""
## 1. The miniature world

`synthetic.style_policy_pool()` is the fixed pool; the last 16 policies are never trained on
(held-out policies for POLAR's evaluation). The reward-model tasks draw from it:
`synthetic:style_pairs` (BT pairs), `synthetic:style_quads` (POLAR pretraining quads
{prompt, a1, a2, b1}), `synthetic:style_triples` (POLAR fine-tuning triples).
""")
nb.code(r"""
import json
import time
from contextlib import redirect_stdout

import numpy as np

from jaxrl_rm.data import synthetic

pool = synthetic.style_policy_pool()
prompt = "tell me about the sea"
rng = np.random.default_rng(0)
show_table(["policy", "letters", "separator", "case", "word length", "words", "T", "a sample"],
           [[p.name, p.letters, repr(p.sep), p.case, p.word_len, p.n_words, p.temperature, p.sample(prompt, rng)]
            for p in pool[:5]])
print("BT pair:     ", synthetic.rm_records("style_pairs", 1, seed=0)[0])
print("POLAR quad:  ", synthetic.rm_records("style_quads", 1, seed=0)[0])
print("POLAR triple:", synthetic.rm_records("style_triples", 1, seed=0)[0])
""")
nb.md(r"""
## 2. Training runs

Each stage is one command (`python -m jaxrl_rm.main --config configs/<stage>.yaml`); here
`jaxrl_rm.main.main([...])` runs it from Python. A run directory holds `metrics.jsonl`,
`summary.json` (held-out accuracy before / after / gain) and the trained RM as an HF directory in
`hf/` (`*ForSequenceClassification` with one label). A finished run is reused when the notebook is
re-run. Four runs: BT; POLAR pretraining; POLAR fine-tuning from the pretrained RM; and the paper's
"w/o PT" ablation, fine-tuning from a random init (`model.path=`).
""")
nb.code(r"""
from jaxrl_rm.main import main

COMMON = ["logging.tensorboard=false", f"logging.progress={str(not TINY).lower()}"]
if TINY:
    COMMON += ["checkpoint.every=0", "train.log_every=5", "rm.eval_size=64"]


def run(name, config, *overrides):
    # python -m jaxrl_rm.main --config <config> run_dir=<WORK/name> <overrides>; a finished run is reused.
    run_dir = WORK / name
    done = run_dir / "summary.json"
    if done.exists() and not json.loads(done.read_text()).get("preempted"):
        print(f"{name}: finished earlier, reusing {run_dir}")
        return run_dir
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "a") as log, redirect_stdout(log):
        code = main(["--config", str(config), f"run_dir={run_dir}", *COMMON, *overrides])
    assert code == 0, f"{name}: exit status {code} (see {run_dir / 'stdout.log'})"
    print(f"{name}: {time.perf_counter() - start:.0f} s -> {run_dir}")
    return run_dir


tiny = lambda *o: list(o) if TINY else []
bt = run("bt", CONFIGS / "rm_bt_tiny.yaml",
         *tiny("train.steps=20", "train.eval_every=10", "data.synthetic_size=1024"))
pt = run("polar_pretrain", CONFIGS / "polar_pretrain_tiny.yaml",
         *tiny("train.steps=30", "train.eval_every=15", "data.synthetic_size=2048"), *([] if TINY else ["train.eval_every=100"]))
ft = run("polar_finetune", CONFIGS / "polar_finetune_tiny.yaml", f"model.path={pt / 'hf'}",
         *tiny("train.steps=16", "train.eval_every=8", "data.synthetic_size=1024"), *([] if TINY else ["train.eval_every=50"]))
ft_nopt = run("polar_finetune_no_pt", CONFIGS / "polar_finetune_tiny.yaml", "model.path=",
              *tiny("train.steps=16", "train.eval_every=8", "data.synthetic_size=1024"), *([] if TINY else ["train.eval_every=50"]))
""")
nb.md(r"""
## 3. Accuracy

Held-out accuracy is "the preferred side scores higher" on data the RM never saw: BT — held-out
prompts (per subset); POLAR pretraining — held-out prompts *and* quads involving one of the 16
held-out policies (`policy_discrimination_accuracy`); POLAR fine-tuning — held-out prompts.
""")
nb.code(r"""
from jaxrl_rm.report import read_run

runs = {"BT": (bt, "eval_accuracy"), "POLAR pretrain": (pt, "policy_discrimination_accuracy"),
        "POLAR finetune": (ft, "eval_accuracy"), "POLAR finetune w/o PT": (ft_nopt, "eval_accuracy")}
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for name, (path, metric) in runs.items():
    r = read_run(path, name)
    steps, values = zip(*r.series[metric])
    axes[0].plot(steps, values, marker="o", label=name)
    loss_steps, losses = zip(*r.series["bt_loss"])
    axes[1].plot(loss_steps, losses, label=name)
    summary = json.loads((path / "summary.json").read_text())
    i = list(runs).index(name)
    axes[2].bar([i - 0.2, i + 0.2], [summary[f"{metric}_before"], summary[f"{metric}_after"]], 0.4,
                color=["lightgray", f"C{i}"])
    axes[2].text(i + 0.2, summary[f"{metric}_after"] + 0.02, f"{summary[f'{metric}_after']:.2f}", ha="center", fontsize=8)
axes[0].set(title="held-out accuracy", xlabel="step", ylim=(0.3, 1.02))
axes[1].set(title="training BT loss", xlabel="step")
axes[2].set_xticks(range(len(runs)), list(runs), fontsize=8, rotation=10)
axes[2].set(title="before (gray) / after training", ylim=(0, 1.1))
for ax in axes[:2]:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

bt_summary = json.loads((bt / "summary.json").read_text())
print({k: round(v, 3) for k, v in bt_summary.items() if k.startswith("eval_accuracy/") and k.endswith("_after")})
""")
nb.md(r"""
## 4. Scoring with a BT reward model

`BTScorer.from_pretrained(hf_dir)` loads the exported RM and its tokenizer; `score(prompts, responses)`
batches, pads to bucketed lengths and runs one jitted forward per block. The margin r(chosen) −
r(rejected) on held-out pairs:
""")
nb.code(r"""
from jaxrl_rm.rewards.scalar_rm import BTScorer, PolarScorer

bt_scorer = BTScorer.from_pretrained(bt / "hf", max_length=64)
pairs = synthetic.rm_records("style_pairs", 256 if not TINY else 64, seed=0, split="eval")
prompts = [p.prompt for p in pairs]
r_chosen = bt_scorer.score(prompts, [p.chosen for p in pairs])
r_rejected = bt_scorer.score(prompts, [p.rejected for p in pairs])
show_table(["prompt", "chosen", "r(chosen)", "rejected", "r(rejected)"],
           [[p.prompt, p.chosen, float(a), p.rejected, float(b)] for p, a, b in list(zip(pairs, r_chosen, r_rejected))[:4]])
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(r_chosen - r_rejected, bins=20)
ax.axvline(0, color="k", linewidth=1)
ax.set(title=f"held-out margins: accuracy {np.mean(r_chosen > r_rejected):.2f}", xlabel="r(chosen) − r(rejected)")
plt.show()
""")
nb.md(r"""
## 5. A POLAR case study

As in the paper's case studies: one prompt, one reference answer, and candidates that are more or
less like it. The POLAR RM should rank them by closeness to the *reference's policy* — not by any
fixed taste: swap the reference for another policy's answer and the ranking follows it.
`PolarScorer.builder` shows the exact token layout the head reads.
""")
nb.code(r"""
polar = PolarScorer.from_pretrained(ft / "hf", max_length=128)
target, other = pool[3], pool[200]
rng = np.random.default_rng(1)
reference = target.sample(prompt, rng)
candidates = {
    "the reference itself": reference,
    "same policy, another sample": target.sample(prompt, rng),
    "near variant (other separator / lengths)": target.variant(seed=5).sample(prompt, rng),
    "same letters, other casing": __import__("dataclasses").replace(
        target, case="upper" if target.case != "upper" else "lower").sample(prompt, rng),
    "another policy": other.sample(prompt, rng),
    "off-topic text": "i do not know",
}
ids, head = polar.builder.build(prompt, reference, candidates["another policy"])
print("POLAR input:", repr(polar.tokenizer.decode(ids)), "| head reads token", head)


def rank(reference):
    scores = polar.score([prompt] * len(candidates), [reference] * len(candidates), list(candidates.values()))
    return sorted(zip(candidates, candidates.values(), scores.tolist()), key=lambda t: -t[2])


show_table(["candidate", "text", "r(p, ref, cand)"], rank(reference))
print("reference:", reference)
other_ref = other.sample(prompt, rng)
show_table(["candidate (reference now from the other policy)", "text", "r(p, ref, cand)"], rank(other_ref))
print("reference:", other_ref)
""")
nb.md(r"""
## 6. Real data, and using the RMs as rewards

The same stages take files instead of `synthetic:` sources:

| stage | `data.train` | record |
|---|---|---|
| `rm_bt` | `pairs.jsonl` · `hh_rlhf:<file.jsonl.gz>` · `alpaca_eval:<dir>` | `{prompt, chosen, rejected[, subset]}` |
| `polar_pretrain` | `quads.jsonl` (e.g. from `task: polar_data`, `configs/polar_data_tiny.yaml`) | `{prompt, a1, a2, b1}` |
| `polar_finetune` | `triples.jsonl` · `alpaca_eval:<dir>` (the baseline answer is the reference) | `{prompt, reference, chosen, rejected}` |

```bash
python -m jaxrl_rm.main --config configs/rm_bt_hh_tiny.yaml                 # BT on HH-RLHF harmless-base
python -m jaxrl_rm.main --config configs/polar_data_tiny.yaml               # POLAR pretraining quads from a policy pool
python -m jaxrl_rm.main --config configs/polar_pretrain_tiny.yaml data.train=runs/polar_data_tiny/quads.jsonl
python -m jaxrl_rm.main --config configs/polar_finetune_alpaca_tiny.yaml    # POLAR fine-tuning on AlpacaEval triples
```

`model.path=<a local HF causal LM>` starts an RM from a real backbone (its LM head is dropped, a
scalar head added). In GRPO a trained RM is a reward source:
`rewards: [{type: bt_rm, path: runs/rm_bt_tiny/hf}]`, or for open-ended prompts with a reference
answer `rewards: [{type: polar_rm, path: runs/polar_finetune_tiny/hf}]`.

The loaders are plain functions too. HH-RLHF transcripts become `PreferencePair`s (the shared
prompt as chat messages, the two final assistant turns); the RM trained above on the miniature
world is — as it should be — at chance on them:
""")
nb.code(r"""
from jaxrl_rm.data.loaders import load_hh_rlhf
from jaxrl_rm.eval.reward_model import bt_pair_accuracy

hh_file = SHARED_DATA / "hh_rlhf" / "harmless_base_test.jsonl.gz"
if hh_file.exists():
    hh_pairs, stats = load_hh_rlhf(hh_file, on_bad_row="skip")
    print(f"{len(hh_pairs)} pairs from {stats.rows_read} rows ({stats.rows_skipped} skipped: {stats.skipped_by_reason})")
    example = hh_pairs[0]   # harmless-base holds red-teaming conversations: print their shape, not their text
    print("prompt roles:", [m["role"] for m in example.prompt], "| chosen / rejected characters:",
          len(example.chosen), "/", len(example.rejected), "| id:", example.id)
    print("miniature-world BT RM on 64 HH pairs:", bt_pair_accuracy(bt_scorer, hh_pairs[:64]))
else:
    print(f"no HH-RLHF file under {SHARED_DATA} (set JAXRL_RM_SHARED_DATA); skipped")
""")


# =====================================================================================================
# 03 judges
# =====================================================================================================
nb = notebook("03_judges")
nb.md(r"""
# 03 · LM judges: templates, parsers, accuracy and position bias

A generative judge is an LM that reads a judge prompt and writes its reasoning and a verdict. The
library uses judges as **reward sources** (RLLM's separately trained judge, `type: judge`; URPO's
policy judging itself, `type: self_judge`), **trains** them (J1, `task: judge_j1`) and **evaluates**
them (`jaxrl_rm.eval.judge`). Three pieces make that work, and this notebook shows each:

1. **templates** (`jaxrl_rm.rewards.judges`): the prompt text *and* the output format it asks for;
2. **parsers** (`jaxrl_rm.rewards.parsers`): never-raising parsers of that format → `ParseResult(valid, value, reason)`;
3. **evaluation**: pointwise accuracy on labelled answers, pairwise accuracy judged in *both orders*,
   with position consistency (does the verdict survive swapping A and B?).

No training here: the judges are scripted functions (an oracle, a position-biased judge, a
length-biased judge) plus a tiny LM, so every metric has a known right answer.
""")
nb.code(setup_cell("03_judges"))
nb.code(table_helper())
nb.md(r"""
## 1. Render every template

`TEMPLATE_NAMES` lists the built-ins: six formats, each with a `_ref` variant that shows a reference
answer. `get_template(name, **options)` builds one (`min_score`, `max_score`, `integer`, `system`, …);
`template.render(tokenizer, prompt=…, response=…)` fills the placeholders and applies the tokenizer's
chat template (pass `None` for plain text). The judged item here is a string-reversal question.
""")
nb.code(r"""
from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.rewards import TEMPLATE_NAMES, get_template

tokenizer = build_char_tokenizer()   # any HF tokenizer with a chat template works the same way
question, gold = "reverse:abcd=", "dcba"
candidates = ["dcba", "dcab", "abcd"]


def fields(template):
    # The placeholders a template's format needs (responses for listwise, A/B for pairwise, ...).
    f = {"prompt": question}
    if template.format == "pointwise":
        f["response"] = candidates[0]
    elif template.format in ("pairwise", "pairwise_scores"):
        f.update(response_a=candidates[0], response_b=candidates[1])
    else:
        f["responses"] = candidates
    if template.uses_reference:
        f["reference"] = gold
    return f


rendered = {name: get_template(name).render(tokenizer, **fields(get_template(name))) for name in TEMPLATE_NAMES}
show_table(["template", "format", "scores", "reference", "chars", "char-tokens"],
           [[name, t.format, f"{t.min_score:g}–{t.max_score:g}{' int' if t.integer else ''}", t.uses_reference,
             len(rendered[name]), len(tokenizer(rendered[name]).input_ids)]
            for name, t in ((n, get_template(n)) for n in TEMPLATE_NAMES)])
""")
nb.code(r"""
for name in ("pointwise", "pointwise_correctness_ref", "pairwise", "pairwise_scores", "listwise", "listwise_tags"):
    print(f"==================== {name} ====================")
    print(rendered[name])
    print()
""")
nb.md(r"""
## 2. Parse judge outputs

Each format has a parser; `template.parse(text, n=…)` calls it with the template's options (score
range, integrality, think tags). Parsers **never raise**: malformed output is `valid=False` with a
`reason` — and a reward source turns that into a (low) reward instead of a crash. The last
well-formed answer wins; reasoning is required; master keys (`":"`, `"Thought process:"`) and
empty outputs are rejected before anything else.
""")
nb.code(r"""
from jaxrl_rm.rewards import kendall_tau, parse_listwise, parse_pointwise, verdict_from_scores

think = "<think>Reversing abcd gives dcba; the response matches.</think>"
cases = [
    ("pointwise_correctness", think + "<score>1</score>", None),
    ("pointwise_correctness", "<score>1</score>", None),                          # no reasoning
    ("pointwise_correctness", think + "<score>7</score>", None),                  # outside 0-1
    ("pointwise_correctness", think + "<score>0.5</score>", None),                # not an integer
    ("pointwise", think + "<score>4</score> wait, <score>8.5</score>", None),     # the last one wins
    ("pointwise", think + "<score>8</score>" + " and more text" * 5, None),      # trailing text
    ("pointwise", "Thought process:", None),                                      # master key
    ("pairwise", think + "<answer>[[A]]</answer>", None),
    ("pairwise", think + "<answer>A</answer>", None),                             # not a [[verdict]]
    ("pairwise_scores", think + "<score_A>9</score_A><score_B>3</score_B>", None),
    ("listwise", r"Response 2 swaps two letters, response 3 is not reversed. Scores: \boxed{10, 4, 1}", 3),
    ("listwise", r"Scores: \boxed{10, 4}", 3),                                    # no analysis, wrong count
    ("listwise_tags", think + "<score_1>9</score_1><score_2>2</score_2><score_3>0</score_3>", 3),
]
rows = []
for name, text, n in cases:
    r = get_template(name).parse(text, n=n)
    rows.append([name, text, r.valid, r.value, r.reason])
show_table(["template", "judge output", "valid", "value", "reason"], rows)

# The parsers can be called directly, with the options spelled out:
print(parse_pointwise(think + "<score> 1 </score>", min_score=0, max_score=1, integer=True))
print(parse_listwise(r"2 is a copy of the question. Scores: \boxed{9, 1}", n=2, think_tags=None))
# pairwise_scores -> a verdict; equal scores are a tie.
print(verdict_from_scores(get_template("pairwise_scores").parse(think + "<score_A>9</score_A><score_B>3</score_B>")))
print(verdict_from_scores(get_template("pairwise_scores").parse(think + "<score_A>5</score_A><score_B>5</score_B>")))
""")
nb.md(r"""
A listwise judgment is rewarded (URPO) by **Kendall τ** between its scores and the gold ranking:
τ = 2/(N(N−1)) Σ_{i<j} sign((s_i − s_j)(g_i − g_j)) — 1 for the right order, −1 for the reverse, and ties
count 0. Below, all 24 orders of 4 responses:
""")
nb.code(r"""
import itertools

import numpy as np

gold_scores = np.array([3.0, 2.0, 1.0, 0.0])
taus = {perm: float(kendall_tau(np.array(perm, float), gold_scores)) for perm in itertools.permutations(range(4))}
print("judge scores (3,2,1,0) ->", taus[(3, 2, 1, 0)], "| (0,1,2,3) ->", taus[(0, 1, 2, 3)],
      "| all ties ->", float(kendall_tau(np.ones(4), gold_scores)))
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.hist(list(taus.values()), bins=np.linspace(-1.0833, 1.0833, 14), rwidth=0.8)
ax.set(title="Kendall τ of all 24 orderings of 4 responses", xlabel="τ", ylabel="orderings")
plt.show()
""")
nb.md(r"""
## 3. Judge accuracy and position bias

`jaxrl_rm.eval.judge` evaluates any **judge callable** `judge(list_of_prompt_texts) -> list_of_outputs`
— a model wrapped in `TextJudge`, or a plain function:

* `evaluate_pointwise(judge, examples, template=…)` on `JudgmentExample`s (prompt, response, label):
  `accuracy` (invalid counts as wrong), `invalid_rate`, `accuracy/label_<t>`, `balanced_accuracy`.
* `evaluate_pairwise(judge, pairs, template=…)` on `PreferencePair`s judges every pair **twice**, as
  (A = chosen, B = rejected) and swapped: `accuracy` over both orders, `consistent_accuracy` (right in
  both), `position_consistency` (same winner in both orders), `position_bias_rate`, `a_rate` (share
  of "A" verdicts; 0.5 for an unbiased judge on this design), `invalid_rate`, per-`subset` accuracy.

The data: held-out string-reversal questions; the right answer vs the same answer with one random
edit (`synthetic.corrupt_answer`: substitute, delete, insert or swap). The pair's subset says whether
the wrong answer is shorter, longer or as long — which matters to a length-biased judge.
""")
nb.code(r"""
import re

from jaxrl_rm.data import synthetic
from jaxrl_rm.data.records import JudgmentExample, PreferencePair
from jaxrl_rm.eval.judge import evaluate_pairwise, evaluate_pointwise

N = 32 if TINY else 256
rng = np.random.default_rng(0)
problems = synthetic.reverse_problems(N, seed=1, split="eval")
wrong = [synthetic.corrupt_answer(p.answer, rng) for p in problems]
examples = [JudgmentExample(prompt=p.prompt, response=p.answer if i % 2 else w, label=bool(i % 2), reference=p.answer)
            for i, (p, w) in enumerate(zip(problems, wrong))]
side = lambda w, g: "rejected_shorter" if len(w) < len(g) else "rejected_longer" if len(w) > len(g) else "same_length"
pairs = [PreferencePair(prompt=p.prompt, chosen=p.answer, rejected=w, subset=side(w, p.answer))
         for p, w in zip(problems, wrong)]
print(examples[0], pairs[0], sep="\n")

# Scripted judges read the question and the answers back out of the rendered prompt.
QUESTION = re.compile(r"\[User Question\]\n(.*?)\n\n\[", re.S)
ANSWER = re.compile(r"\[The Start of the Assistant's Answer\]\n(.*?)\n\[The End of the Assistant's Answer\]", re.S)
A_OR_B = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)
solve = lambda text: QUESTION.search(text).group(1)[len("reverse:"):-1][::-1]
score = lambda s: f"<think>The reversal of the question's string is what I compare against.</think><score>{s}</score>"
verdict = lambda v: f"<think>I compared both answers with the reversed string.</think><answer>[[{v}]]</answer>"


def oracle_pointwise(texts):
    return [score(int(ANSWER.search(t).group(1) == solve(t))) for t in texts]


def yes_man_pointwise(texts):        # "everything is correct"
    return [score(1) for _ in texts]


def oracle_pairwise(texts):
    return [verdict("A" if dict(A_OR_B.findall(t))["A"] == solve(t) else "B") for t in texts]


def first_position_pairwise(texts):  # always prefers whatever is shown first
    return [verdict("A") for _ in texts]


def longer_pairwise(texts):          # prefers the longer answer (A on a tie)
    return [verdict("A" if len((a := dict(A_OR_B.findall(t)))["A"]) >= len(a["B"]) else "B") for t in texts]


def biased_oracle(bias, seed=0):     # says "A" with probability `bias`, otherwise judges correctly
    r = np.random.default_rng(seed)
    return lambda texts: [verdict("A") if r.random() < bias else o for o in oracle_pairwise(texts)]
""")
nb.code(r"""
pointwise = {name: evaluate_pointwise(judge, examples, template="pointwise_correctness", tokenizer=tokenizer)
             for name, judge in [("oracle", oracle_pointwise), ("yes-man", yes_man_pointwise)]}
pairwise = {name: evaluate_pairwise(judge, pairs, template="pairwise", tokenizer=tokenizer)
            for name, judge in [("oracle", oracle_pairwise), ("first position", first_position_pairwise),
                                ("longer answer", longer_pairwise), ("oracle, 30% 'A'", biased_oracle(0.3))]}
keys = ["accuracy", "balanced_accuracy", "accuracy/label_0", "accuracy/label_1", "invalid_rate"]
show_table(["pointwise judge"] + keys, [[n] + [m[k] for k in keys] for n, m in pointwise.items()])
keys = ["accuracy", "consistent_accuracy", "position_consistency", "a_rate", "invalid_rate",
        "accuracy/rejected_shorter", "accuracy/rejected_longer", "accuracy/same_length"]
show_table(["pairwise judge"] + keys, [[n] + [m.get(k, float("nan")) for k in keys] for n, m in pairwise.items()])
""")
nb.md(r"""
Reading the tables: the yes-man's 50 % pointwise accuracy is all on the positive label
(`balanced_accuracy` exposes it). The first-position judge is right exactly half the time and never
consistent. The length-biased judge looks good when the wrong answer is shorter (deletions) and fails
when it is longer; judging both orders is what turns its "A on a tie" habit into visible
inconsistency. Sweeping a position bias shows the two curves a judge evaluation should report:
""")
nb.code(r"""
biases = np.linspace(0, 1, 6 if TINY else 11)
sweep = [evaluate_pairwise(biased_oracle(b, seed=1), pairs, template="pairwise", tokenizer=tokenizer) for b in biases]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for key in ("accuracy", "consistent_accuracy", "position_consistency", "a_rate"):
    axes[0].plot(biases, [m[key] for m in sweep], marker="o", label=key)
axes[0].set(title="an oracle that answers 'A' with probability p", xlabel="p")
axes[0].legend(fontsize=8)
names = list(pairwise)
width = 0.2
for k, key in enumerate(("accuracy", "consistent_accuracy", "position_consistency", "a_rate")):
    axes[1].bar(np.arange(len(names)) + (k - 1.5) * width, [pairwise[n][key] for n in names], width, label=key)
axes[1].set_xticks(np.arange(len(names)), names, fontsize=8)
axes[1].set(title="scripted pairwise judges", ylim=(0, 1.3))
axes[1].legend(fontsize=7, ncol=2, loc="upper center")
fig.tight_layout()
plt.show()
""")
nb.md(r"""
## 4. A model as the judge

`TextJudge(model_fn, tokenizer, …)` turns a `Transformer` into a judge callable: prompts are encoded,
keep their **last** `max_prompt_length` tokens (the question and answers sit at the end of every
template), and are sampled in jitted batches. By default this is a random-weight tiny model: it
never writes the format, so every output is invalid — exactly what the metrics should say. Point
`JAXRL_RM_JUDGE_DIR` at a trained judge, e.g. the `hf/` export of

```bash
python -m jaxrl_rm.main --config configs/judge_j1_tiny.yaml     # J1: on-policy judgments, format warm-up, GRPO
```

(`runs/judge_j1_tiny/hf`), and the same cell measures it.
""")
nb.code(r"""
from flax import nnx

from jaxrl_rm.config import ModelSpec
from jaxrl_rm.models import hf
from jaxrl_rm.models.factory import build_model
from jaxrl_rm.rewards.judge_source import TextJudge

JUDGE_DIR = os.environ.get("JAXRL_RM_JUDGE_DIR", "")
if JUDGE_DIR:
    judge_model, judge_tok = hf.load_model(JUDGE_DIR), hf.load_tokenizer(JUDGE_DIR)
else:
    judge_tok = tokenizer
    judge_model = build_model(ModelSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=1), judge_tok, seed=0)
lm_judge = TextJudge(lambda: judge_model, judge_tok, max_prompt_length=128, max_new_tokens=40, greedy=True)
n_lm = 16 if TINY else 128
lm_point = evaluate_pointwise(lm_judge, examples[: 2 * n_lm], template="pointwise_correctness", tokenizer=judge_tok)
lm_pair = evaluate_pairwise(lm_judge, pairs[:n_lm], template="pairwise", tokenizer=judge_tok)
print("a sample output:", repr(lm_judge([rendered["pointwise_correctness"]])[0]))
show_table(["LM judge", "accuracy", "invalid_rate", "position_consistency"],
           [["pointwise", lm_point["accuracy"], lm_point["invalid_rate"], float("nan")],
            ["pairwise", lm_pair["accuracy"], lm_pair["invalid_rate"], lm_pair["position_consistency"]]])
""")
nb.md(r"""
## 5. Real data

The same functions take real labelled data (`../shared/data` in this repository's CI; the cells
below skip when it is absent):

* **GSM8K model solutions** — `load_gsm8k_solutions(path)` gives one `JudgmentExample` per (question,
  policy) with `label = is_correct` and the gold answer as `reference`; `gsm8k_pairs(examples)` makes
  correct-vs-incorrect pairs of the same question.
* **AlpacaEval** — `alpaca_eval_pairs(outputs, annotations)` turns the GPT-4-turbo judge's
  preferences into pairs (winner ≻ loser), subset = the generator.

A rule-based, reference-guided judge (it reads the reference and the answer back out of the
`pointwise_correctness_ref` prompt and runs the math verifier) is nearly perfect on GSM8K, while the
length heuristic shows how much "longer is better" gets you on real pairs:
""")
nb.code(r"""
from jaxrl_rm.eval.judge import gsm8k_pairs
from jaxrl_rm.rewards import MathVerifier

solutions = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl.gz"
if solutions.exists():
    from jaxrl_rm.data.loaders import load_gsm8k_solutions

    gsm8k, stats = load_gsm8k_solutions(solutions)
    gsm8k = gsm8k[: (200 if TINY else 2000)]
    REFERENCE = re.compile(r"\[Reference Answer\]\n(.*?)\n\[End of Reference Answer\]", re.S)
    verifier = MathVerifier(backend="inline", answer_formats=("a_colon", "gsm8k", "boxed", "answer_is"))

    def verifier_judge(texts):
        refs = [REFERENCE.search(t).group(1) for t in texts]
        answers = [ANSWER.search(t).group(1) for t in texts]
        return [score(int(r > 0)) for r in verifier(answers, refs).rewards]

    real_point = evaluate_pointwise(verifier_judge, gsm8k, template="pointwise_correctness_ref")
    real_pairs = gsm8k_pairs(gsm8k, max_pairs_per_question=1)
    real_pair = {name: evaluate_pairwise(judge, real_pairs, template="pairwise")
                 for name, judge in [("longer answer", longer_pairwise), ("first position", first_position_pairwise)]}
    print(f"{len(gsm8k)} GSM8K judgments ({stats.rows_skipped} bad rows skipped), {len(real_pairs)} pairs")
    show_table(["judge on GSM8K", "accuracy", "balanced_accuracy / consistent_accuracy", "position_consistency"],
               [["verifier (pointwise, reference)", real_point["accuracy"], real_point["balanced_accuracy"], float("nan")]]
               + [[n, m["accuracy"], m["consistent_accuracy"], m["position_consistency"]] for n, m in real_pair.items()])
else:
    print(f"no GSM8K solutions under {SHARED_DATA} (set JAXRL_RM_SHARED_DATA); skipped")
""")
nb.md(r"""
Where to go next: `configs/judge_j1_tiny.yaml` trains a judge (J1) and exports it; a GRPO task uses it
with `rewards: [{type: judge, path: runs/judge_j1_tiny/hf, options: {mode: pointwise}}]` (modes
`pointwise`, `pairwise`, `pivot`, `listwise`; position bias of pairwise modes is logged as
`reward/<task>/judge/position_bias_rate`). Notebook 04 compares such an RLLM run with RLVR and URPO.
""")


# =====================================================================================================
# 04 GRPO: RLVR vs RLLM vs URPO
# =====================================================================================================
nb = notebook("04_grpo")
nb.md(r"""
# 04 · GRPO with three kinds of reward: RLVR vs RLLM vs URPO

One GRPO loop, three answers to "who scores the samples?":

| run | reward | paper |
|---|---|---|
| **RLVR** | a rule verifier against the gold answer (`exact_match`) | DAPO-style RL with verifiable rewards |
| **RLLM** | a *separately trained* LM judge's pointwise score (`type: judge`); no gold answers at train time | RLLM / J1 |
| **URPO** | one model is player *and* referee: verifiable prompts, N-way rankings rewarded by Kendall τ, and open-ended prompts rewarded by the policy's own listwise judgment (`self_judge`), joining later (curriculum) | URPO |

Every run writes the same run directory (`config.yaml`, `metrics.jsonl`, `summary.json`, `hf/`), so
comparing them is reading `metrics.jsonl` files — `jaxrl_rm.report.read_run` — and plotting.

**Use your own runs:** set `RUN_DIRS` below (or `JAXRL_RM_RUN_DIRS="rlvr=/abs/runs/quickstart/rlvr,rllm=/abs/runs/quickstart/rllm,urpo=/abs/runs/urpo_tiny"`;
relative paths are relative to the kernel's working directory) and nothing is trained. Otherwise the notebook makes the runs itself, in the miniature world
(string reversal with a 300k-parameter policy), with the settings of `configs/quickstart_j1.yaml` (the J1 judge recipe as the papers give it) and
`configs/urpo_tiny.yaml` — on the order of half an hour on a laptop CPU, or a few minutes with
`JAXRL_RM_NOTEBOOK_TINY=1` (six RL steps per run: the curves are then mostly noise, but every
step of the pipeline runs).
""")
nb.code(setup_cell("04_grpo"))
nb.code(r"""
import json
import time
from contextlib import redirect_stdout
from fnmatch import fnmatchcase

import numpy as np

from jaxrl_rm.main import main
from jaxrl_rm.report import read_run

# {label: run directory}; empty = make the runs below.
RUN_DIRS = {}
if os.environ.get("JAXRL_RM_RUN_DIRS"):
    RUN_DIRS = dict(item.split("=", 1) for item in os.environ["JAXRL_RM_RUN_DIRS"].split(",") if item)
MAKE_RUNS = not RUN_DIRS
print("make runs:", MAKE_RUNS, "|", RUN_DIRS)
""")
nb.md(r"""
## 1. Make the runs (skipped when `RUN_DIRS` is set)

`jaxrl_rm.main.main([...])` is `python -m jaxrl_rm.main ...` as a function. Each stage below is one
command; a finished stage (its `summary.json` exists) is reused when the notebook is re-run, an
interrupted one resumes from its checkpoint. The whole chain is also one command:
`python -m jaxrl_rm.main --config configs/quickstart_j1.yaml` (SFT → J1 judge → RLVR vs RLLM; `configs/quickstart.yaml`
is the aligned, refreshed judge that the policy does not hack) and
`python -m jaxrl_rm.main --config configs/urpo_tiny.yaml`.

1. **sft** — SFT of a tiny policy on string reversal (about 25 % held-out accuracy: room for RL);
2. **judge** — J1: the SFT policy answers training questions, the verifier labels its answers, a
   tiny judge learns the `<think>…</think><score>0|1</score>` format and is then trained by GRPO to
   match the labels;
3. **rlvr** — GRPO of the SFT policy, reward = exact match with the gold answer;
4. **rllm** — GRPO of the same SFT policy, reward = the judge's score. The gold answer is used only
   for held-out evaluation (`options.eval_verifier`) and, with weight 0, as a logged *monitor* of
   how often the judge-rewarded samples are really right;
5. **urpo** — one policy, SFT warm-up on demonstrations of all three tasks, then GRPO on the mixture.
""")
nb.code(r"""
# Tiny mode: same recipes, far fewer steps. Full mode: the configs' own settings.
QUIET = ["logging.tensorboard=false", f"logging.progress={str(not TINY).lower()}"]
RL = (["train.steps=6", "train.eval_every=3", "train.log_every=1", "grpo.eval_size=32", "grpo.prompts_per_step=8",
       "checkpoint.every=0"] if TINY else
      ["train.steps=120", "train.eval_every=40", "grpo.eval_size=128"])


def run(name, config, *overrides):
    # python -m jaxrl_rm.main --config <config> run_dir=<WORK/name> <overrides>; a finished run is reused.
    run_dir = WORK / name
    done = run_dir / "summary.json"
    if done.exists() and not json.loads(done.read_text()).get("preempted"):
        print(f"{name}: finished earlier, reusing {run_dir}")
        return run_dir
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "a") as log, redirect_stdout(log):   # the JSON summary line, stage notes
        code = main(["--config", str(config), f"run_dir={run_dir}", *QUIET, *overrides])
    assert code == 0, f"{name}: exit status {code} (see {run_dir / 'stdout.log'})"
    print(f"{name}: {time.perf_counter() - start:.0f} s -> {run_dir}")
    return run_dir


if MAKE_RUNS:
    sft = run("sft", CONFIGS / "sft_reverse_tiny.yaml", *(["train.eval_every=0", "grpo.eval_size=64"] if TINY else []))
    policy = sft / "hf"
    judge = run("judge", CONFIGS / "judge_j1_tiny.yaml", f"judge.policy_path={policy}",
                *(["judge.num_train_prompts=128", "judge.num_eval_prompts=32", "judge.warmup_steps=50",
                   "judge.warmup_batch_size=16", "train.steps=4", "grpo.prompts_per_step=8"] if TINY else []))
    start_from = [f"model.path={policy}", f"model.tokenizer={policy}", "warmup.steps=0"]
    rlvr = run("rlvr", CONFIGS / "rlvr_tiny.yaml", *start_from, *RL)
    rllm = run("rllm", CONFIGS / "rlvr_tiny.yaml", *start_from, *RL,
               "grpo.tasks=[{name: reverse, kind: verifiable, data: 'synthetic:reverse', "
               "options: {eval_verifier: exact_match}, "
               f"rewards: [{{type: judge, path: '{judge / 'hf'}', options: {{mode: pointwise, "
               "template: pointwise_correctness, greedy: true, max_prompt_length: 128, max_new_tokens: 40}}, "
               "{type: exact_match, weight: 0}]}]")
    urpo = run("urpo", CONFIGS / "urpo_tiny.yaml",
               *(RL + ["warmup.steps=100", "warmup.batch_size=16", "grpo.tasks.2.start_step=3"] if TINY
                 else ["train.log_every=1"]))
    RUN_DIRS = {"rlvr": str(rlvr), "rllm": str(rllm), "urpo": str(urpo)}
    JUDGE_DIR = judge
""")
nb.md(r"""
## 2. Read the runs

`read_run(path)` loads `metrics.jsonl` into `run.series[metric] = [(step, value), ...]` (plus
`summary.json` and `config.yaml`). Training steps log the reward statistics (`reward_mean`,
`reward/<task>/<source>/...`), the update (`loss`, `grad_norm`, clip fractions, `approx_kl`) and
diagnostics (`zero_variance_fraction`, `response_length`, `reward_length_correlation`,
`sampler_logp_gap`); evaluation steps log greedy held-out `accuracy` (and `accuracy/<task>`).
""")
nb.code(r"""
runs = [read_run(path, name) for name, path in RUN_DIRS.items()]


def xy(run, key):
    points = run.series.get(key, [])
    return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def keys(run, pattern):
    return sorted(k for k in run.series if fnmatchcase(k, pattern))


for r in runs:
    tasks = [t["name"] for t in r.config.get("grpo", {}).get("tasks", [])]
    print(f"{r.name:6} {len(r.series):3d} metrics, last step {max((p[-1][0] for p in r.series.values()), default=0):4d}, "
          f"tasks {tasks}")
rows = []
for r in runs:
    s = r.summary
    rows.append([r.name, s.get("accuracy_before", float("nan")), s.get("accuracy_after", float("nan")),
                 s.get("accuracy_gain", float("nan")), s.get("steps", "—")])
show = lambda header, rows: print("\n".join(["  ".join(f"{h:>16}" for h in header)] +
                                            ["  ".join(f"{v:>16.3f}" if isinstance(v, float) else f"{v!s:>16}" for v in row) for row in rows]))
show(["run", "accuracy_before", "accuracy_after", "accuracy_gain", "steps"], rows)
""")
nb.md(r"""
## 3. Reward and held-out accuracy

The training reward is not comparable across runs (a verifier's 0/1, a judge's normalised score,
Kendall τ mapped to [0, 1]); held-out accuracy is, because every run is measured the same way:
greedy answers to held-out strings, checked against the gold reversal.
""")
nb.code(r"""
def smooth(values, k=5):
    values = np.asarray(values, float)
    return values if len(values) < k else np.convolve(values, np.ones(k) / k, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
for r in runs:
    steps, values = xy(r, "reward_mean")
    if steps:
        line, = axes[0].plot(steps, values, alpha=0.3)
        k = 5 if len(values) >= 20 else 1
        axes[0].plot(steps[k - 1:], smooth(values, k), color=line.get_color(), label=r.name)
    steps, values = xy(r, "accuracy")
    axes[1].plot(steps, values, marker="o", label=r.name)
axes[0].set(title="training reward (reward_mean; smoothed)", xlabel="step")
axes[1].set(title="held-out greedy accuracy (verifiable task)", xlabel="step", ylim=(0, None))
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()
""")
nb.md(r"""
## 4. Does the judge reward track the truth? (RLLM)

A learned reward can be gamed. The RLLM run logs, for the same training samples, the judge's reward
and the (weight-0) exact-match verdict: if the policy learns to please the judge without being
right, the two curves separate. The judge itself was measured before and after its own RL
(`judge_accuracy_*` in its `summary.json`).
""")
nb.code(r"""
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
for r in runs:
    for key in keys(r, "reward/*/judge/mean") + keys(r, "reward/*/verifier_exact/mean"):
        steps, values = xy(r, key)
        kind = "judge reward" if "/judge/" in key else "exact match"
        axes[0].plot(steps, values, marker="." , linestyle="-" if kind == "judge reward" else "--",
                     label=f"{r.name}: {kind}")
    for key in keys(r, "reward/*/judge/invalid_rate"):
        steps, values = xy(r, key)
        axes[1].plot(steps, values, label=f"{r.name}: judge invalid_rate")
    for key in keys(r, "reward/*/judge/guarded_rate"):
        steps, values = xy(r, key)
        axes[1].plot(steps, values, linestyle="--", label=f"{r.name}: guarded_rate")
axes[0].set(title="training samples: judge reward vs exact match", xlabel="step")
axes[1].set(title="judge outputs that could not be parsed / answers guarded", xlabel="step")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

judge_dir = globals().get("JUDGE_DIR")
if judge_dir is not None and (Path(judge_dir) / "summary.json").exists():
    js = json.loads((Path(judge_dir) / "summary.json").read_text())
    print({k: round(v, 3) for k, v in js.items() if k.startswith("judge_accuracy") and "/" not in k})
""")
nb.md(r"""
## 5. URPO: the task mixture and the curriculum

URPO's batches mix the three tasks in the configured ratio (2 : 1 : 1 here); the open-ended
instruction prompts join at `start_step` (dashed line). Each task logs its own reward
(`reward/<task>/mean`) and each source its `invalid_rate`: a reward stuck at its floor with an
`invalid_rate` near 1 means the policy does not write the format the parser needs — typically the
self-judged instruction reward with a model this small, which has to rank its *own* answers in a
format it saw only in the warm-up's ranking demonstrations. URPO starts from its own SFT warm-up
(demonstrations of all three tasks), so compare its accuracy *gain* with the other runs, not its level.
""")
nb.code(r"""
urpo_runs = [r for r in runs if len(r.config.get("grpo", {}).get("tasks", [])) > 1]
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
for r in urpo_runs:
    for task in r.config["grpo"]["tasks"]:
        steps, values = xy(r, f"reward/{task['name']}/mean")
        if steps:
            axes[0].plot(steps, values, marker=".", label=f"{r.name}: {task['name']} ({task.get('kind', 'verifiable')})")
        if task.get("start_step", 0) > 0:
            axes[0].axvline(task["start_step"], color="gray", linestyle="--", linewidth=1)
    for key in keys(r, "reward/*/invalid_rate"):
        steps, values = xy(r, key)
        axes[1].plot(steps, values, marker=".", label=f"{r.name}: {key}")
axes[0].set(title="per-task training reward", xlabel="step")
axes[1].set(title="unparseable rankings / self-judgments", xlabel="step")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
""")
nb.md(r"""
## 6. Diagnostics worth watching in any GRPO run

* `zero_variance_fraction` — groups whose G rewards are equal teach nothing (DAPO's dynamic sampling
  refills them; `dynamic_sampling/filled_fraction` says how well);
* `response_length` and `reward_length_correlation` — a reward that prefers length is being hacked;
* `sampler_logp_gap` — the sampler's and the trainer's log-probs of the same tokens should agree (≈ 0);
* `clip_frac_high` / `clip_frac_low`, `approx_kl`, `grad_norm` — the size of each update.
""")
nb.code(r"""
panels = ["zero_variance_fraction", "response_length", "reward_length_correlation", "sampler_logp_gap",
          "clip_frac_high", "grad_norm"]
fig, axes = plt.subplots(2, 3, figsize=(14, 6.5))
for ax, key in zip(axes.ravel(), panels):
    for r in runs:
        steps, values = xy(r, key)
        if steps:
            ax.plot(steps, values, label=r.name, alpha=0.8)
    ax.set(title=key, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()
""")
nb.md(r"""
## 7. The same comparison as a report

`python -m jaxrl_rm.report RUN_DIR ... --out DIR` (or `build_report` in Python) writes `report.md` —
last and best value of each metric per run, `summary.json` side by side, the config keys that
differ — and one PNG per metric; `plot_panels` draws several metrics in one figure. (Both draw with
matplotlib's Agg backend, so they come last here.)
""")
nb.code(r"""
from IPython.display import Image, Markdown, display

from jaxrl_rm.report import build_report, plot_panels

report = build_report(list(RUN_DIRS.values()), WORK / "report", names=list(RUN_DIRS),
                      metrics=["reward_mean", "accuracy", "accuracy/*", "response_length", "zero_variance_fraction"])
text = report.read_text()
display(Markdown(text.split("## Plots")[0].split("## summary.json")[0]))
print(f"full report: {report} ({len(list(report.parent.glob('*.png')))} plots)")
display(Image(filename=str(plot_panels(runs, ["reward_mean", "accuracy"], WORK / "comparison.png",
                                       title=" vs ".join(RUN_DIRS)))))
""")


# =====================================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for spec in NOTEBOOKS:
        path = HERE / f"{spec.name}.ipynb"
        text = nbformat.writes(spec.build()) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        elif not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run `python notebooks/_build.py`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

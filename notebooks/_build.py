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
Loading is one call each. `hf.load_tokenizer` is `AutoTokenizer.from_pretrained(path, local_files_only=True)`,
what you want for a real checkpoint. A directory written by `save_model` with the *character* tokenizer
is better read with `scalar_rm.load_tokenizer_exact`, which loads `tokenizer.json` as saved:
transformers 5's `AutoTokenizer` re-derives the model family's tokenizer class from `config.json`,
which can drop the spaces of a character vocabulary — the cell prints both round trips so you can see
whether your installed version does.
""")
nb.code(r"""
from jaxrl_rm.rewards.scalar_rm import load_tokenizer_exact

model = hf.load_model(MODEL_DIR)                  # -> jaxrl_rm.models.transformer.Transformer
tokenizer = load_tokenizer_exact(MODEL_DIR)       # tokenizer.json as saved (else AutoTokenizer)
auto_tokenizer = hf.load_tokenizer(MODEL_DIR)

print(type(model).__name__, f"{model.config.num_params():,} parameters", model.config.model_type)
text = "reverse: ab cd"
for name, tok in [("load_tokenizer_exact", tokenizer), ("hf.load_tokenizer", auto_tokenizer)]:
    print(f"{name:22} {type(tok).__name__:28} round trip: {tok.decode(tok(text).input_ids)!r}")

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
print("tokens", res.tokens.shape, "| finish reasons", list(res.finish_reason[:G]),
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
axes[2].hist(np.asarray(rewards).ravel(), bins=10, alpha=0.6, label="step 1 (collected above)")
last_parts, _, _ = rl.collect(state["params"], step=STEPS)
axes[2].hist(np.concatenate([p[3].ravel() for p in last_parts]), bins=10, alpha=0.6, label="after training")
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

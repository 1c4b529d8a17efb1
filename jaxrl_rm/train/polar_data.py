"""POLAR pretraining-data synthesis (task polar_data): quads `{prompt, a1, a2, b1}` from a policy pool.

Dou et al. (2025), App. A.1.1: for each prompt pick two different policies from the pool; the
first samples two trajectories (a1 = reference, a2 = positive), the second one (b1 = negative).
Prompts are instructions (used as given, through each policy's chat template) or prefixes of
1..N tokens cut at random from a text corpus (continued as raw text). The paper samples with
temperature 1.0, top-p 0.9, top-k 50 (each `PolicySpec` carries its own settings).

Policies (`polar_data.policies[].path`): an HF causal-LM directory, a run directory (e.g. an SFT
run: config.yaml + latest orbax checkpoint), `synthetic:style:<k>` (a built-in style policy,
`jaxrl_rm.data.synthetic.StylePolicy`), or empty (a random init of `model.*` with the spec's seed).
All LM policies are loaded once, up front.

Determinism and resumption. Prompts are processed in chunks of `polar_data.batch_size`; a
prompt's policy pair depends only on (seed, prompt index) (`synthetic.pick_policy_pair`), and a
chunk's samples only on (seed, chunk index, policy): so the output file is a pure function of
(config, seed). A chunk's lines are written together and flushed. On restart the complete lines
are read, the last chunk present is dropped (it may be partial) and synthesis continues from its
first prompt, so an interrupted run ends with exactly the file an uninterrupted run writes.
Quads whose three answers are not all non-empty are skipped and counted (`skipped_empty`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from jaxrl_rm.configlib import ConfigError
from jaxrl_rm.data import synthetic
from jaxrl_rm.data.pipeline import encode, render_prompt
from jaxrl_rm.data.records import PolarQuad
from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
from jaxrl_rm.train.loop import prepare_run_dir, write_summary

STYLE_PREFIX = "synthetic:style:"


def derive_seed(*parts) -> int:
    """A 31-bit seed from any ints / strings (stable across processes and Python versions)."""
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


class Policy(Protocol):
    name: str

    def sample(self, prompts: Sequence, indices: Sequence[int], n: int, seed: int) -> list[list[str]]:
        """`n` answers per prompt (`indices`: the prompts' global indices) -> `[len(prompts)][n]` texts."""


class StyleSamplingPolicy:
    """A `synthetic.StylePolicy` as a pool member (per-prompt random streams)."""

    def __init__(self, style, name: str | None = None):
        self.style, self.name = style, name or style.name

    def sample(self, prompts, indices, n, seed):
        out = []
        for prompt, i in zip(prompts, indices):
            rng = np.random.default_rng([seed, int(i), n])
            out.append([self.style.sample(prompt, rng) for _ in range(n)])
        return out


class LMPolicy:
    """A causal LM sampled with `jaxrl_rm.sampling.generate` (its own temperature / top-p / top-k)."""

    def __init__(self, model, tokenizer, spec, *, name: str, chat_template: bool, raw_prompts: bool):
        self.model, self.tokenizer, self.spec, self.name = model, tokenizer, spec, name
        self.chat_template, self.raw_prompts = chat_template, raw_prompts
        eos = tokenizer.eos_token_id
        self.stop_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

    def prompt_ids(self, prompt) -> list[int]:
        if self.raw_prompts:
            text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        else:
            text = render_prompt(prompt, self.tokenizer, chat_template=self.chat_template)
        ids = encode(self.tokenizer, text)
        if not ids:  # a prompt must have at least one token to condition on
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.stop_ids[0]]
        return ids

    def sample(self, prompts, indices, n, seed):
        from jaxrl_rm.sampling import generate

        s = self.spec
        max_prompt = max(self.model.config.max_position_embeddings - s.max_new_tokens, 1)
        result = generate(self.model, [self.prompt_ids(p) for p in prompts], num_samples=n,
                          max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          stop_token_ids=self.stop_ids, seed=seed, max_prompt_len=max_prompt, truncate_prompt="left")
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in result.completions()]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


# --- policy loading ---------------------------------------------------------------------------
def load_run_model(run_dir: str | Path):
    """(Transformer, tokenizer) from a run directory: its config.yaml's model + the latest orbax checkpoint."""
    from jaxrl_rm.config import load_config
    from jaxrl_rm.models.factory import build_model
    from jaxrl_rm.parallel.mesh import make_mesh
    from jaxrl_rm.train.checkpoint import Checkpointer
    from jaxrl_rm.train.state import Trainer, abstract_like, make_optimizer
    from flax import nnx

    run_dir = Path(run_dir)
    run_cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_or_build_tokenizer(run_cfg.model.tokenizer or run_cfg.model.path)
    model = build_model(run_cfg.model, tokenizer, seed=run_cfg.seed)
    trainer = Trainer(graphdef=nnx.split(model)[0], optimizer=make_optimizer(run_cfg.optim, run_cfg.train.steps),
                      mesh=make_mesh())
    state = trainer.init_state(model, run_cfg.seed)
    ckpt = Checkpointer(run_dir / "checkpoints", every=0, keep=1, async_save=False)
    try:
        state, _, _ = ckpt.restore(abstract_like(state))
    finally:
        ckpt.close()
    return trainer.model(state), tokenizer


def build_policy(spec, index: int, cfg, default_tokenizer):
    """A pool member from a `PolicySpec` (see module docstring)."""
    from jaxrl_rm.models.factory import build_model
    import dataclasses

    path = spec.path
    if path.startswith(STYLE_PREFIX):
        k = int(path[len(STYLE_PREFIX):])
        pool = synthetic.style_policy_pool()
        if not 0 <= k < len(pool):
            raise ConfigError(f"polar_data.policies[{index}].path: style policy {k} out of range 0..{len(pool) - 1}")
        return StyleSamplingPolicy(pool[k], name=spec.name or pool[k].name)
    if not path:
        model = build_model(dataclasses.replace(cfg.model, path=""), default_tokenizer, seed=spec.seed)
        tokenizer, name = default_tokenizer, spec.name or f"random{spec.seed}"
    elif (Path(path) / "config.json").exists():
        from jaxrl_rm.models.hf import load_model
        from jaxrl_rm.data.tokenizer import load_tokenizer

        model, tokenizer, name = load_model(path), load_tokenizer(path), spec.name or Path(path).name
    elif (Path(path) / "config.yaml").exists() and (Path(path) / "checkpoints").is_dir():
        (model, tokenizer), name = load_run_model(path), spec.name or Path(path).name
    else:
        raise ConfigError(f"polar_data.policies[{index}].path: {path!r} is neither an HF model directory "
                          "(config.json), a run directory (config.yaml + checkpoints/), nor synthetic:style:<k>")
    return LMPolicy(model, tokenizer, spec, name=name, chat_template=cfg.polar_data.chat_template,
                    raw_prompts=cfg.polar_data.prompt_kind == "prefix")


# --- prompts ----------------------------------------------------------------------------------
def _documents(path: str, cfg):
    """Texts of a corpus: `.txt` (one document per line) or JSONL rows' `text_field`."""
    from jaxrl_rm.data.errors import BadRowPolicy
    from jaxrl_rm.data.loaders import iter_rows
    from jaxrl_rm.data.records import RowValidator

    if path.endswith(".txt"):
        return [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]
    policy = BadRowPolicy.coerce(cfg.data.on_bad_row)
    docs = []
    for line, row in iter_rows(path, on_bad_row=policy):
        try:
            docs.append(RowValidator(row, file=path, line=line).req_str(cfg.polar_data.text_field))
        except Exception as err:  # BadRowError
            policy.bad(err)
    return docs


def whole_characters(tokenizer, ids: Sequence[int], length: int) -> str:
    """The text of `ids[:length]`, cut back to its last whole character: a byte-level BPE token
    can end inside a multi-byte character (decoded as U+FFFD). A first character that needs more
    than `length` tokens is kept whole instead."""
    text = ""
    for cut in [*range(length, 0, -1), *range(length + 1, len(ids) + 1)]:
        text = tokenizer.decode(ids[:cut])
        if not text.endswith("\ufffd"):
            break
    return text


def load_prompts(cfg, tokenizer) -> list:
    """The prompts of a data run, in order (see `PolarDataConfig.prompts` / `prompt_kind`)."""
    pd = cfg.polar_data
    n = pd.num_prompts
    name = synthetic.parse_source(pd.prompts)
    if name is not None:
        if name != "style_prompts":
            raise ConfigError(f"polar_data.prompts: unknown synthetic prompt source {name!r}; available: style_prompts")
        if n <= 0:
            raise ConfigError("polar_data.num_prompts: a synthetic prompt source needs num_prompts > 0")
        return synthetic.style_prompts(n, seed=cfg.seed)
    if pd.prompt_kind == "instruction":
        from jaxrl_rm.data.errors import BadRowPolicy
        from jaxrl_rm.data.loaders import iter_rows
        from jaxrl_rm.data.records import RowValidator

        policy = BadRowPolicy.coerce(cfg.data.on_bad_row)
        prompts = []
        for line, row in iter_rows(pd.prompts, on_bad_row=policy):
            try:
                prompts.append(RowValidator(row, file=pd.prompts, line=line).prompt(cfg.data.prompt_field))
            except Exception as err:  # BadRowError
                policy.bad(err)
            if n and len(prompts) >= n:
                break
        return prompts
    prompts = []
    for i, doc in enumerate(_documents(pd.prompts, cfg)):
        ids = encode(tokenizer, doc)
        if not ids:
            continue
        rng = np.random.default_rng([cfg.seed, i, 5])
        hi = min(pd.max_prefix_tokens, len(ids))
        length = int(rng.integers(min(pd.min_prefix_tokens, hi), hi + 1))
        prompts.append(whole_characters(tokenizer, ids, length))
        if n and len(prompts) >= n:
            break
    return prompts


# --- synthesis --------------------------------------------------------------------------------
def _prompt_index(row_id: str) -> int:
    return int(str(row_id).rsplit("-", 1)[1])


def resume_point(path: Path, batch_size: int) -> tuple[int, int]:
    """(first prompt index to generate, lines kept) after truncating `path` to its complete chunks."""
    if not path.exists():
        return 0, 0
    data = path.read_bytes()
    lines, offsets, pos = [], [], 0
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is partial (or empty)
        lines.append(raw)
        pos += len(raw) + 1
        offsets.append(pos)
    if not lines:
        with open(path, "r+b") as f:
            f.truncate(0)
        return 0, 0
    indices = [_prompt_index(json.loads(raw)["id"]) for raw in lines]
    last_chunk = indices[-1] // batch_size
    keep = sum(1 for i in indices if i // batch_size < last_chunk)
    with open(path, "r+b") as f:
        f.truncate(offsets[keep - 1] if keep else 0)
    return last_chunk * batch_size, keep


def synthesize_chunk(policies: list, prompts: list, indices: list[int], *, seed: int, chunk: int) -> tuple[list, int]:
    """Quads of one chunk (in prompt order) and the number skipped for an empty answer."""
    pairs = [synthetic.pick_policy_pair(seed, i, len(policies)) for i in indices]
    a_texts: dict[int, list[str]] = {}
    b_texts: dict[int, str] = {}
    for k, policy in enumerate(policies):
        # One call per policy and chunk, two samples for every prompt it takes part in (as B it
        # uses the first): one generate shape per policy instead of two (compiles dominate on CPU).
        mine = [j for j, (a, b) in enumerate(pairs) if k in (a, b)]
        if not mine:
            continue
        outs = policy.sample([prompts[j] for j in mine], [indices[j] for j in mine], 2, derive_seed(seed, chunk, k))
        for j, texts in zip(mine, outs):
            if pairs[j][0] == k:
                a_texts[j] = texts
            else:
                b_texts[j] = texts[0]
    quads, skipped = [], 0
    for j, (i, (a, b)) in enumerate(zip(indices, pairs)):
        a1, a2 = a_texts[j]
        b1 = b_texts[j]
        if not (a1.strip() and a2.strip() and b1.strip()):
            skipped += 1
            continue
        quads.append(PolarQuad(prompt=prompts[j], a1=a1, a2=a2, b1=b1, policy_a=policies[a].name,
                               policy_b=policies[b].name, id=f"polar-{seed}-{i}"))
    return quads, skipped


def synthesize(policies: list, prompts: list, output: str | Path, *, seed: int, batch_size: int,
               progress: bool = False) -> dict:
    """Write (or resume) the quads of `prompts` to `output`; returns counts."""
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise ConfigError(f"polar_data.policies: policy names must be unique, got {names}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start, kept = resume_point(output, batch_size)
    written, skipped = 0, 0
    chunks = range(start // batch_size, -(-len(prompts) // batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc="polar_data", dynamic_ncols=True)
    with open(output, "a", encoding="utf-8") as f:
        for c in chunks:
            idx = list(range(c * batch_size, min((c + 1) * batch_size, len(prompts))))
            quads, s = synthesize_chunk(policies, [prompts[i] for i in idx], idx, seed=seed, chunk=c)
            f.write("".join(json.dumps(q.to_dict(), ensure_ascii=False) + "\n" for q in quads))
            f.flush()
            os.fsync(f.fileno())
            written, skipped = written + len(quads), skipped + s
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {"prompts": len(prompts), "resumed_from_prompt": start, "quads_kept_on_resume": kept,
            "quads_written": written, "skipped_empty": skipped, "quads_total": kept + written}


def run_polar_data(cfg) -> dict:
    """Task polar_data: synthesise POLAR pretraining quads per `cfg.polar_data`; returns the summary."""
    import jax

    run_dir = prepare_run_dir(cfg)
    pd = cfg.polar_data
    if jax.process_index() != 0:  # one writer: synthesis runs on process 0 (each policy on its local devices)
        return {"task": "polar_data", "process": jax.process_index()}
    tokenizer = load_or_build_tokenizer(cfg.model.tokenizer or cfg.model.path)
    prompts = load_prompts(cfg, tokenizer)
    if not prompts:
        raise ConfigError(f"polar_data.prompts: no prompts in {pd.prompts!r}")
    policies = [build_policy(spec, i, cfg, tokenizer) for i, spec in enumerate(pd.policies)]
    output = Path(pd.output) if pd.output else run_dir / "quads.jsonl"
    counts = synthesize(policies, prompts, output, seed=cfg.seed, batch_size=pd.batch_size,
                        progress=cfg.logging.progress)
    per_policy: dict[str, int] = {}
    for line in output.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for role in ("policy_a", "policy_b"):
            per_policy[f"{role}/{row[role]}"] = per_policy.get(f"{role}/{row[role]}", 0) + 1
    summary = {"task": "polar_data", "output": str(output), "policies": [p.name for p in policies], **counts,
               **{f"count/{k}": v for k, v in sorted(per_policy.items())}}
    write_summary(cfg, summary)
    return summary

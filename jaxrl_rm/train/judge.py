"""J1 judge training (task ``judge_j1``): on-policy judgment data, format warm-up, GRPO with score match.

The RLLM recipe for the LM-as-RM, in three resumable stages under ``run_dir``:

1. **data** (``<run_dir>/judge_data/``) — sample ``judge.responses_per_prompt`` answers per
   problem from a sampler (``judge.train_sampler``: ``policy`` = the policy being judged, i.e.
   on-policy; ``corrupt`` = a rule-based "other model" (gold answers with random edits); or an HF
   directory of another model — off-policy is the same pipeline with another sampler), label each
   with the teacher (``judge.teacher``: exact match or math-verify against the gold answer), drop
   empty and duplicate answers, balance the labels (``judge.balance_by: prompt``: each training prompt
   half right, half wrong answers), and write ``train.jsonl`` / ``eval.jsonl``
   (``JudgmentExample``: prompt, response, label, reference = gold). Held-out judgments come from
   held-out problems answered by ``judge.eval_sampler`` (default: the policy). Supplied judgment
   files (``judge.data`` / ``judge.eval_data``: teacher scores given) skip this stage. When
   ``judge.policy_path`` is empty the policy is first trained by SFT (``<run_dir>/policy_sft``).
2. **warmup** (``<run_dir>/judge_warmup``) — optional SFT of the judge on the training
   judgments (``judge.warmup_data``: the balanced set, or ``all`` labelled ones, e.g. for a
   format-only warm-up that should see many answers; ``judge.warmup_corrupt``: a share of them
   with the answer replaced by a rule-made one, see :func:`with_corrupted_answers`),
   so a tiny model can emit ``<think>…</think><score>…</score>`` at all. Its targets
   are ``<think>{reasoning}</think><score>{s}</score>`` where ``s`` is the teacher label with
   probability ``1 − judge.warmup_label_noise`` and a uniformly random score otherwise (default
   noise 1.0: the warm-up teaches the format and the reasoning, *not* the verdicts — the judge
   starts RL at chance accuracy on balanced data) and the reasoning is ``judge.warmup_think``
   (``compare``: ``want <gold answer>, got <judged answer>`` — the judge learns to solve
   the problem in its thinking and to set the answer beside its own; ``reference``: the worked
   gold answer only; ``response``: a restatement of the judged answer; ``fixed``: a constant
   sentence).
3. **rl** — GRPO (``jaxrl_rm.train.grpo``, every ``grpo.*`` setting applies) of the judge on a
   ``kind: judgment`` task built from the training judgments, reward ``score_match`` (1 when the
   parsed score equals the label, within ``judge.tolerance``; a judgment cut by
   ``grpo.max_new_tokens`` before its stop token earns 0). Held-out judgment accuracy
   (greedy; invalid = wrong) is measured before and after: ``judge_accuracy_before``,
   ``judge_accuracy_after``, ``judge_accuracy_gain`` in ``summary.json``, and so is the
   gold-vs-near-miss AUC on held-out problems (``judge_near_miss_auc_before`` / ``_after``; the
   judge's score of each gold answer against its one-edit near misses, the within-group order
   GRPO acts on; see :func:`jaxrl_rm.eval.judge.evaluate_near_miss`). The trained judge is
   exported to ``<run_dir>/hf`` (usable as ``type: judge, path: <run_dir>/hf``).

Judge prompts use the ``judge.template`` (default ``pointwise_correctness``) through the chat
template, and keep their last ``grpo.max_prompt_length`` tokens: with a small budget the fixed
instructions at the head are cut and the question and answer (at the tail) are kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrl_rm.config import RULE_LABELLED_TEACHERS, RewardSpec, TaskSpec
from jaxrl_rm.data import synthetic
from jaxrl_rm.data.records import JudgmentExample, SFTRecord, VerifiableProblem
from jaxrl_rm.rewards.judge_source import TextJudge, content_seed, label_score, prompt_as_text
from jaxrl_rm.rewards.judges import JudgeTemplate, aligned_check, get_template
from jaxrl_rm.train.grpo import GRPO
from jaxrl_rm.train.loop import prepare_run_dir, summarize, train_loop, write_summary

SAMPLERS = ("policy", "corrupt")
_FIXED_THINK = "I check the answer against the question."


# ============================================================================ stage 1: data


def load_problems(source: str, *, split: str, seed: int, n: int) -> list[VerifiableProblem]:
    """`n` problems from `synthetic:<task>` (split train / eval), a JSONL of {prompt, answer}, or
    `gsm8k:<path>` / `math:<path>` (`jaxrl_rm.data.loaders.load_verifiable`; files: their first n)."""
    name = synthetic.parse_source(source)
    if name is not None:
        if name not in synthetic.TASKS:
            raise ValueError(f"judge.problems: unknown synthetic task {name!r}; available: {sorted(synthetic.TASKS)}")
        return synthetic.TASKS[name](n, seed=seed, split=split)
    from jaxrl_rm.data.loaders import load_verifiable

    records, _ = load_verifiable(source)
    return records[:n]


def policy_responses(path: str, problems, *, n: int, temperature: float, max_new_tokens: int, seed: int,
                     chat_template: bool = True, mesh=None, batch_size: int = 256) -> list[list[str]]:
    """`n` sampled answers per problem from the HF model at `path` (its own tokenizer)."""
    from jaxrl_rm.data.pipeline import encode, render_prompt
    from jaxrl_rm.data.tokenizer import load_tokenizer
    from jaxrl_rm.models.hf import load_model
    from jaxrl_rm.sampling import generate

    model, tok = load_model(path), load_tokenizer(path)
    eos = [t for t in {tok.eos_token_id} if t is not None]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[list[str]] = []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        ids = [encode(tok, render_prompt(p.prompt, tok, chat_template=chat_template)) for p in chunk]
        res = generate(model, ids, num_samples=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_token_ids=eos, seed=content_seed(seed, s), mesh=mesh, pad_id=pad)
        tokens, mask = np.asarray(res.tokens), np.asarray(res.mask)
        texts = tok.batch_decode([row[m] for row, m in zip(tokens, mask)], skip_special_tokens=True)
        out += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


def sample_answers(sampler: str, problems, j, *, seed: int, policy_path: str, chat_template: bool, mesh) -> list[list[str]]:
    """Answers of `sampler` (policy | corrupt | an HF directory) to `problems`."""
    if sampler == "corrupt":
        alphabet = "".join(sorted({c for p in problems for c in p.answer})) or "abcdefgh"
        return synthetic.corrupted_responses(problems, j.responses_per_prompt, seed=seed,
                                             p_correct=j.corrupt_p_correct, alphabet=alphabet)
    path = policy_path if sampler == "policy" else sampler
    if not (Path(path) / "config.json").exists():
        raise ValueError(f"judge sampler {sampler!r}: {path} is not an HF model directory "
                         f"(use one of {list(SAMPLERS)} or a model path)")
    return policy_responses(path, problems, n=j.responses_per_prompt, temperature=j.temperature,
                            max_new_tokens=j.max_new_tokens, seed=seed, chat_template=chat_template, mesh=mesh)


def label_answers(problems, answers, *, teacher: str = "exact_match", dedupe: bool = True):
    """Teacher-labelled `JudgmentExample`s (label = the verifier accepts the answer) and counts."""
    from jaxrl_rm.rewards.verifiers import make_verifier

    verifier = make_verifier(teacher)
    flat = [(p, k, a) for p, row in zip(problems, answers) for k, a in enumerate(row)]
    stats = {"sampled": len(flat), "empty": 0, "duplicates": 0}
    if not flat:
        return [], stats
    out = verifier([a for _, _, a in flat], [p.answer for p, _, _ in flat],
                   prompts=[prompt_as_text(p.prompt) for p, _, _ in flat])
    labels = np.asarray(out.rewards) > 0
    stats["sampler_accuracy"] = float(labels.mean())
    examples, seen = [], set()
    for (p, k, a), lab in zip(flat, labels):
        if not a.strip():
            stats["empty"] += 1
            continue
        key = (prompt_as_text(p.prompt), a)
        if dedupe and key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        examples.append(JudgmentExample(prompt=p.prompt, response=a, label=bool(lab), reference=p.answer,
                                        id=f"{p.id}:{k}"))
    return examples, stats


def _downsample_to_smallest(groups: list[list], rng: np.random.Generator) -> list:
    """Each group downsampled (without replacement, order kept) to the smallest group's size,
    drawn from `rng` in the groups' order; concatenated."""
    m = min(len(v) for v in groups)
    return [v[i] for v in groups for i in sorted(rng.choice(len(v), size=m, replace=False))]


def balance_labels(examples, *, seed: int) -> list:
    """Every label value downsampled (seeded) to the rarest one's count, then shuffled."""
    rng = np.random.default_rng([seed, 37])
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.label, []).append(ex)
    if len(groups) < 2:
        return list(examples)
    kept = _downsample_to_smallest([groups[k] for k in sorted(groups, key=repr)], rng)
    return [kept[i] for i in rng.permutation(len(kept))]


def balance_per_prompt(examples, *, seed: int) -> list:
    """For each prompt, its right and its wrong answers downsampled (seeded) to the smaller count;
    prompts with only one label are dropped; then shuffled. Every prompt's verdicts are then half
    right, half wrong, so the prompt alone predicts nothing (J1 judges pairs of one prompt)."""
    rng = np.random.default_rng([seed, 53])
    by_prompt: dict = {}
    for ex in examples:
        by_prompt.setdefault(prompt_as_text(ex.prompt), {}).setdefault(bool(ex.label), []).append(ex)
    kept = []
    for groups in by_prompt.values():
        if len(groups) == 2:  # prompts with one label only are dropped
            kept += _downsample_to_smallest([groups[True], groups[False]], rng)
    return [kept[i] for i in rng.permutation(len(kept))]


def _label_counts(examples) -> dict:
    pos = sum(1 for e in examples if bool(e.label))
    return {"examples": len(examples), "positive": pos, "negative": len(examples) - pos}


def with_tokenizer_dir(cfg):
    """Pin the run's tokenizer to one directory for every stage.

    With the built-in character tokenizer (`model.path` and `model.tokenizer` empty) it is saved
    to `<run_dir>/tokenizer` (tokenizer files only) and `model.tokenizer` points there. Loading it
    back from a model export instead would go through AutoTokenizer with the export's
    `config.json`, which in transformers 5 picks the model family's tokenizer class and drops
    spaces and newlines (see `jaxrl_rm.data.tokenizer.load_tokenizer`); judge templates are
    full of both.
    """
    if cfg.model.tokenizer or cfg.model.path:
        return cfg
    from jaxrl_rm.data.tokenizer import build_char_tokenizer

    path = Path(cfg.run_dir) / "tokenizer"
    if jax.process_index() == 0 and not (path / "tokenizer.json").exists():
        build_char_tokenizer(path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=str(path)))


def _with_model(cfg, path: str):
    """cfg.model loading weights from `path`, keeping a pinned tokenizer directory."""
    if not path:
        return cfg.model
    return dataclasses.replace(cfg.model, path=path, tokenizer=cfg.model.tokenizer or path)


def ensure_policy(cfg) -> str | None:
    """The response policy's HF directory: `judge.policy_path`, or an SFT run under `<run_dir>/policy_sft`
    (None when that stage was preempted)."""
    j = cfg.judge
    if j.policy_path:
        return j.policy_path
    stage = Path(cfg.run_dir) / "policy_sft"
    export = stage / "hf"
    if (export / "config.json").exists():
        return str(export)
    if j.policy_sft_steps == 0:  # an untrained policy: export the random init
        from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
        from jaxrl_rm.models.factory import build_model
        from jaxrl_rm.models.hf import save_model

        tok = load_or_build_tokenizer(cfg.model.tokenizer or cfg.model.path)
        if jax.process_index() == 0:
            save_model(build_model(cfg.model, tok, seed=cfg.seed), export, tokenizer=tok)
        return str(export)
    from jaxrl_rm.train.sft import run_sft

    is_file = synthetic.parse_source(j.problems) is None
    sft_cfg = dataclasses.replace(
        cfg, task="sft", run_dir=str(stage),
        train=dataclasses.replace(cfg.train, steps=j.policy_sft_steps, batch_size=j.policy_sft_batch_size,
                                  micro_batches=1, eval_every=0),
        optim=dataclasses.replace(cfg.optim, learning_rate=j.policy_sft_lr),
        data=dataclasses.replace(cfg.data, train=j.problems, eval="", prompt_field="prompt",
                                 response_field="answer" if is_file else "response"))
    if run_sft(sft_cfg).get("preempted"):
        return None
    return str(export)


def build_judgment_data(cfg, *, policy_path: str | None, mesh=None) -> tuple[str, str, dict]:
    """Stage "data": write (or reuse) `<run_dir>/judge_data/{train,eval}.jsonl`; returns their paths and stats."""
    from jaxrl_rm.data.loaders import load_records, write_jsonl

    j = cfg.judge
    if j.data:
        train, _ = load_records(j.data, JudgmentExample)
        stats = {f"train_{k}": v for k, v in _label_counts(train).items()}
        if j.eval_data:
            ev, _ = load_records(j.eval_data, JudgmentExample)
            stats.update({f"eval_{k}": v for k, v in _label_counts(ev).items()})
            return j.data, j.eval_data, stats
        # hold out a seeded tenth of the supplied judgments (by prompt)
        out_dir = Path(cfg.run_dir) / "judge_data"
        tr_path, ev_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
        prompts = sorted({prompt_as_text(e.prompt) for e in train})
        rng = np.random.default_rng([cfg.seed, 41])
        held = {prompts[i] for i in rng.permutation(len(prompts))[: max(1, len(prompts) // 10)]}
        tr = [e for e in train if prompt_as_text(e.prompt) not in held]
        ev = [e for e in train if prompt_as_text(e.prompt) in held]
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(tr_path, tr)
            write_jsonl(ev_path, ev)
        stats = {**{f"train_{k}": v for k, v in _label_counts(tr).items()},
                 **{f"eval_{k}": v for k, v in _label_counts(ev).items()}}
        return str(tr_path), str(ev_path), stats

    out_dir = Path(cfg.run_dir) / "judge_data"
    tr_path, ev_path, st_path = out_dir / "train.jsonl", out_dir / "eval.jsonl", out_dir / "stats.json"
    if st_path.exists() and tr_path.exists() and ev_path.exists():
        return str(tr_path), str(ev_path), json.loads(st_path.read_text())
    stats: dict = {}
    paths = {}
    for split, sampler, src, n in (("train", j.train_sampler, j.problems, j.num_train_prompts),
                                   ("eval", j.eval_sampler, j.eval_problems or j.problems, j.num_eval_prompts)):
        if split == "eval" and not j.eval_problems and not src.startswith("synthetic:"):
            raise ValueError("judge.eval_problems: a file source of problems needs held-out problems")
        problems = load_problems(src, split=split if src.startswith("synthetic:") else "train", seed=cfg.seed, n=n)
        answers = sample_answers(sampler, problems, j, seed=content_seed(cfg.seed, split), policy_path=policy_path,
                                 chat_template=cfg.data.chat_template, mesh=mesh)
        examples, st = label_answers(problems, answers, teacher=j.teacher, dedupe=j.dedupe)
        stats.update({f"{split}_{k}": v for k, v in st.items()})
        stats.update({f"{split}_unbalanced_{k}": v for k, v in _label_counts(examples).items()})
        if split == "train" and jax.process_index() == 0:  # the warm-up may read every judgment
            out_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(out_dir / "train_all.jsonl", examples)
        if j.balance and split == "train" and j.balance_by == "prompt":
            examples = balance_per_prompt(examples, seed=content_seed(cfg.seed, split))
        elif j.balance:
            examples = balance_labels(examples, seed=content_seed(cfg.seed, split))
        stats.update({f"{split}_{k}": v for k, v in _label_counts(examples).items()})
        if not examples or len({bool(e.label) for e in examples}) < 2 and j.balance:
            raise ValueError(f"judge data ({split}): sampler {sampler!r} produced {len(examples)} usable judgments "
                             f"with a single label ({st}); a judge cannot learn from that — change the sampler "
                             "or the policy (e.g. judge.policy_sft_steps)")
        paths[split] = out_dir / f"{split}.jsonl"
        if jax.process_index() == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(paths[split], examples)
    if jax.process_index() == 0:
        st_path.write_text(json.dumps(stats, indent=1, sort_keys=True))
    return str(tr_path), str(ev_path), stats


# ============================================================================ stage 2: warm-up


def _fmt_score(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def warmup_records(examples, template: str | JudgeTemplate = "pointwise_correctness", *, label_noise: float = 1.0,
                   think: str = "reference", seed: int = 0) -> list[SFTRecord]:
    """SFT records (judge prompt -> ``<think>…</think><score>s</score>``) for the format warm-up.

    ``s`` is the teacher label with probability ``1 - label_noise``, else uniformly random in the
    template's range (integers for integer templates, 0.1 steps otherwise). ``think="aligned"``
    writes the character-by-character check of the template's ``{aligned}`` view
    (:func:`jaxrl_rm.rewards.judges.aligned_check`), ``think="path"`` the constraint-by-constraint
    check of a path answer (:func:`jaxrl_rm.data.synthetic.path_written_check`).
    """
    tpl = template if isinstance(template, JudgeTemplate) else get_template(template)
    rng = np.random.default_rng([seed, 31])
    out = []
    for ex in examples:
        if rng.random() < label_noise:
            if tpl.integer:
                score = float(rng.integers(int(tpl.min_score), int(tpl.max_score) + 1))
            else:
                score = round(float(rng.uniform(tpl.min_score, tpl.max_score)), 1)
        else:
            score = label_score(ex.label, tpl)
        if think == "aligned":
            reasoning = aligned_check(ex.reference or "", ex.response, tpl.aligned_width)
        elif think == "path":
            reasoning = synthetic.path_written_check(prompt_as_text(ex.prompt), ex.response)
        else:
            reasoning = {"compare": f"want {ex.reference}, got {ex.response}" if ex.reference else _FIXED_THINK,
                         "reference": ex.reference or _FIXED_THINK, "response": ex.response, "fixed": _FIXED_THINK}[think]
        extra = {"reference": ex.reference} if tpl.uses_reference else {}
        system, user = tpl.fill(prompt=prompt_as_text(ex.prompt), response=ex.response, **extra)
        prompt = user if system is None else ({"role": "system", "content": system}, {"role": "user", "content": user})
        out.append(SFTRecord(prompt=prompt, response=f"<think>{reasoning}</think><score>{_fmt_score(score)}</score>",
                             id=ex.id))
    return out


def with_corrupted_answers(examples, fraction: float, *, p_correct: float, seed: int) -> list:
    """A seeded `fraction` of `examples` with the answer replaced, labelled by exact match (a path
    task's by its check, `synthetic.rule_label`): the
    gold answer with probability `p_correct`; otherwise, in equal shares, the gold with one random
    edit, a random string, or one character repeated (1-8 characters; the last two are the
    degenerate answers an RL policy tries on its judge). Warm-up data of the judge's *reasoning*:
    a policy's own mistakes follow patterns (which positions it gets wrong) that a small judge
    learns instead of checking the answer; these leave it nothing to learn but the check."""
    alphabet = "".join(sorted({c for e in examples for c in (e.reference or "")})) or "abcdefgh"
    rng = np.random.default_rng([seed, 53])
    out = []
    for e in examples:
        if e.reference and rng.random() < fraction:
            kind, n = int(rng.integers(3)), int(rng.integers(1, 9))
            if rng.random() < p_correct:
                a = e.reference
            elif kind == 0:
                a = synthetic.corrupt_answer(e.reference, rng, alphabet=alphabet)
            elif kind == 1:
                a = "".join(alphabet[int(i)] for i in rng.integers(len(alphabet), size=n))
            else:
                a = alphabet[int(rng.integers(len(alphabet)))] * n
            e = dataclasses.replace(e, response=a, label=synthetic.rule_label(prompt_as_text(e.prompt), a, e.reference))
        out.append(e)
    return out


def judge_init_path(cfg, policy_path: str | None) -> str:
    j = cfg.judge
    if j.judge_init == "policy":
        if not policy_path:
            raise ValueError("judge.judge_init=policy needs a response policy (judge.policy_path or policy_sft_steps)")
        return policy_path
    return j.judge_init or cfg.model.path


def judge_warmup(cfg, train_path: str, init_path: str) -> str | None:
    """Stage "warmup": SFT of the judge on the format; returns its HF export ("" without warm-up,
    None when preempted)."""
    from jaxrl_rm.data.loaders import load_records, write_jsonl
    from jaxrl_rm.data.pipeline import check_demonstrations_fit
    from jaxrl_rm.data.tokenizer import load_or_build_tokenizer
    from jaxrl_rm.train.sft import run_sft

    j, g = cfg.judge, cfg.grpo
    if j.warmup_steps <= 0:
        return init_path
    stage = Path(cfg.run_dir) / "judge_warmup"
    export = stage / "hf"
    if (export / "config.json").exists():
        return str(export)
    all_path = Path(train_path).parent / "train_all.jsonl"
    if j.warmup_data == "all" and not all_path.exists():
        raise ValueError(f"judge.warmup_data=all: {all_path} is missing (it is written when judgments are sampled "
                         "here, not for supplied judge.data)")
    examples, _ = load_records(str(all_path) if j.warmup_data == "all" else train_path, JudgmentExample)
    if j.warmup_corrupt > 0:
        examples = with_corrupted_answers(examples, j.warmup_corrupt, p_correct=j.corrupt_p_correct, seed=cfg.seed)
    records = warmup_records(examples, judge_template(cfg), label_noise=j.warmup_label_noise, think=j.warmup_think,
                             seed=cfg.seed)
    model = _with_model(cfg, init_path)
    # the tokenizer the warm-up SFT will load (run_sft: model.tokenizer or model.path)
    check_demonstrations_fit(records, load_or_build_tokenizer(model.tokenizer or model.path),
                             max_new_tokens=g.max_new_tokens, chat_template=cfg.data.chat_template,
                             where=f"grpo.max_new_tokens (judge warm-up, judge.warmup_think={j.warmup_think})")
    data_path = Path(cfg.run_dir) / "judge_data" / "warmup.jsonl"
    if jax.process_index() == 0:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(data_path, records)
    sft_cfg = dataclasses.replace(
        cfg, task="sft", run_dir=str(stage), model=model,
        train=dataclasses.replace(cfg.train, steps=j.warmup_steps, batch_size=j.warmup_batch_size,
                                  micro_batches=1, eval_every=0),
        optim=dataclasses.replace(cfg.optim, learning_rate=j.warmup_lr),
        data=dataclasses.replace(cfg.data, train=str(data_path), eval="", prompt_field="prompt",
                                 response_field="response", max_length=g.max_prompt_length + g.max_new_tokens,
                                 packing=False))
    if run_sft(sft_cfg).get("preempted"):
        return None
    return str(export)


# ============================================================================ stage 3: RL


def judge_template(cfg) -> JudgeTemplate:
    """`judge.template` with `judge.template_options`."""
    return get_template(cfg.judge.template, **cfg.judge.template_options)


def judge_task(cfg, train_path: str, eval_path: str) -> TaskSpec:
    """The `kind: judgment` GRPO task of the J1 stage."""
    j = cfg.judge
    return TaskSpec(name="judge", kind="judgment", data=train_path, eval_data=eval_path,
                    rewards=[RewardSpec(type="score_match", options={"tolerance": j.tolerance, "truncated_reward": 0.0})],
                    options={"template": j.template, "template_options": dict(j.template_options)})


def near_miss_set(cfg, examples) -> tuple[list, list[list[str]]]:
    """The held-out problems and near misses of the gold-vs-near-miss AUC (`judge.near_miss_prompts`):
    the first distinct (prompt, reference) pairs of the held-out judgments `examples` and
    `judge.near_misses_per_prompt` one-edit misses of each reference (seeded by `seed`; on the
    path task, edits that are still valid walks are drawn again). None (empty lists) when it is
    off, when the teacher is math-verify (an edited math answer may still be right) or when the
    judgments carry no references."""
    from jaxrl_rm.eval.judge import near_miss_answers

    j = cfg.judge
    if j.near_miss_prompts <= 0 or j.teacher not in RULE_LABELLED_TEACHERS:
        return [], []
    distinct: dict = {}
    for e in examples:
        if e.reference:
            distinct.setdefault((prompt_as_text(e.prompt), e.reference), e)
    problems = list(distinct.values())[: j.near_miss_prompts]
    return problems, near_miss_answers(problems, j.near_misses_per_prompt, seed=cfg.seed)


class JudgeGRPO(GRPO):
    """GRPO of a judge; `evaluate` is held-out judgment accuracy (greedy) on `eval_examples` and the
    gold-vs-near-miss AUC on their problems (:func:`near_miss_set`; `judge_near_miss_*`)."""
    def __init__(self, cfg, eval_examples):
        super().__init__(cfg)
        self.eval_examples = list(eval_examples)
        self.near_miss_problems, self.near_misses = near_miss_set(cfg, self.eval_examples)

    def judge_fn(self, params) -> TextJudge:
        model = nnx.merge(self.trainer.graphdef, params)
        return TextJudge(lambda: model, self.tokenizer, max_prompt_length=self.P, max_new_tokens=self.T,
                         greedy=True, batch_size=256, mesh=self.mesh)

    def evaluate(self, state) -> dict:
        from jaxrl_rm.eval.judge import evaluate_pointwise, near_miss_metrics, near_miss_prompts

        judge, tpl = self.judge_fn(state["params"]), judge_template(self.cfg)
        tok = self.tokenizer if self.cfg.data.chat_template else None
        m = evaluate_pointwise(judge, self.eval_examples, template=tpl, tokenizer=tok,
                               tolerance=self.cfg.judge.tolerance)
        out = {f"judge_{k}": float(v) for k, v in m.items() if not k.startswith("count")}
        if self.near_miss_problems:  # what GRPO with this judge acts on: gold above near misses, within a problem
            texts = near_miss_prompts(self.near_miss_problems, self.near_misses, tpl, tok)
            nm = near_miss_metrics(judge(texts), self.cfg.judge.near_misses_per_prompt, tpl)
            out.update({f"judge_near_miss_{k}": float(v) for k, v in nm.items() if k != "count"})
        return out


def run_judge_j1(cfg) -> dict:
    """Train a judge per `cfg` (task=judge_j1); returns the summary written to summary.json."""
    from jaxrl_rm.data.loaders import load_records
    from jaxrl_rm.models.hf import save_model
    from jaxrl_rm.parallel.mesh import fetch_global, mesh_from_config

    run_dir = prepare_run_dir(cfg)
    cfg = with_tokenizer_dir(cfg)
    j = cfg.judge
    needs_policy = not j.data and "policy" in (j.train_sampler, j.eval_sampler)
    policy_path = ensure_policy(cfg) if (needs_policy or j.judge_init == "policy") else None
    if (needs_policy or j.judge_init == "policy") and policy_path is None:
        return {"task": "judge_j1", "preempted": True, "stage": "policy_sft"}
    train_path, eval_path, data_stats = build_judgment_data(cfg, policy_path=policy_path,
                                                            mesh=mesh_from_config(cfg.mesh))
    judge_path = judge_warmup(cfg, train_path, judge_init_path(cfg, policy_path))
    if judge_path is None:
        return {"task": "judge_j1", "preempted": True, "stage": "judge_warmup"}

    model = _with_model(cfg, judge_path)
    rl_cfg = dataclasses.replace(cfg, model=model, grpo=dataclasses.replace(cfg.grpo, tasks=[judge_task(cfg, train_path, eval_path)]),
                                 warmup=dataclasses.replace(cfg.warmup, steps=0))
    eval_examples, _ = load_records(eval_path, JudgmentExample)
    if j.eval_size:
        eval_examples = eval_examples[: j.eval_size]
    rl = JudgeGRPO(rl_cfg, eval_examples)
    result = train_loop(cfg=rl_cfg, state=rl.state, abstract_state=rl.abstract_state, run_step=rl.run_step,
                        evaluate=rl.evaluate, host_state=rl.host_state, restore_host_state=rl.restore_host_state,
                        desc="judge_j1")
    summary = summarize(result.eval_before, result.eval_after, task="judge_j1", steps=result.step,
                        preempted=result.preempted, policy_path=policy_path or "", judge_init=judge_path or "",
                        **{f"data/{k}": v for k, v in data_stats.items()})
    summary["reward_guard"] = rl.guard_report()
    if not result.preempted:
        params = fetch_global(result.state["params"])
        if jax.process_index() == 0:
            save_model(nnx.merge(rl.trainer.graphdef, params), run_dir / "hf", tokenizer=rl.tokenizer)
        summary["judge_path"] = str(run_dir / "hf")
    write_summary(rl_cfg, summary)
    rl.final_state = result.state
    return summary

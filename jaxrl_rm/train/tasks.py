"""RL task mixtures: prompt sources with ratios and a curriculum, drawn deterministically.

Each `TaskSpec` brings its prompts (`PromptItem`s), its prompt format and its reward sources. A
batch of B prompts is split over the tasks active at this step (`start_step <= step`) in
proportion to their ratios with largest-remainder rounding, so the mixture holds exactly over
batches (the URPO P:R:I mix), and open-ended prompts can join after a warm-up.
Which prompts are drawn is a pure function of (seed, per-task draw counters); the counters are
the mixer's resumable state. A ranking task's responses are shown in a fresh order at every draw
(`shuffle_ranking`; `options.shuffle_responses: false` keeps the data's order), again a pure
function of (seed, draw counter, item id), so a resumed run shows the same orders.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np

from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.rewards.judges import ranking_template


def load_task_items(task, *, split: str, seed: int, size: int) -> list[PromptItem]:
    """PromptItems of a TaskSpec: `task.data` (train) or `task.eval_data` / a held-out synthetic split.

    Ranking items come with their responses in a seeded order of their own (`shuffle_ranking`), so
    held-out rankings and warm-up demonstrations carry no position shortcut either."""
    from jaxrl_rm.data import synthetic

    source = task.data if split == "train" else (task.eval_data or (task.data if task.data.startswith("synthetic:") else ""))
    if not source:
        return []
    name = synthetic.parse_source(source)
    if name is not None:
        items = synthetic.prompt_items(name, task, split=split, seed=seed, size=size)
    else:
        items = _load_items_from_file(source, task)
    return [shuffle_ranking(it, task, seed, split, k) for k, it in enumerate(items)]


def shuffle_ranking(item: PromptItem, task, seed: int, *key) -> PromptItem:
    """A ranking item with its responses and gold scores permuted together (other items as they
    are): data converted from preference pairs lists the chosen response first, a position shortcut
    a ranker must not learn. The permutation is a pure function of (seed, task, `key`, item id);
    `task.options.shuffle_responses: false` keeps the data's order."""
    if task.kind != "ranking" or not task.options.get("shuffle_responses", True) or item.gold_scores is None:
        return item
    digest = hashlib.blake2b(repr((seed, task.name, repr(item.id)) + key).encode(), digest_size=8).digest()
    order = np.random.default_rng(int.from_bytes(digest, "little")).permutation(len(item.responses))
    return dataclasses.replace(item, responses=tuple(item.responses[j] for j in order),
                               gold_scores=tuple(item.gold_scores[j] for j in order))


def _load_items_from_file(path: str, task) -> list[PromptItem]:
    from jaxrl_rm.data.loaders import load_records, load_verifiable
    from jaxrl_rm.data.records import JudgmentExample, RankingItem, SFTRecord

    on_bad_row = task.options.get("on_bad_row", "error")
    if task.kind == "verifiable":  # a {prompt, answer} file, or gsm8k:<path> / math:<path>
        records, _ = load_verifiable(path, on_bad_row=on_bad_row, field_map=task.options.get("field_map"))
        return [PromptItem(task=task.name, prompt=r.prompt, answer=r.answer, reference=r.answer, id=r.id)
                for r in records]
    if task.kind == "open":
        fmap = task.options.get("field_map") or {"reference": "response"}
        records, _ = load_records(path, SFTRecord, on_bad_row=on_bad_row, field_map=fmap)
        return [PromptItem(task=task.name, prompt=r.prompt, reference=r.response, id=r.id) for r in records]
    if task.kind == "ranking":
        records, _ = load_records(path, RankingItem, on_bad_row=on_bad_row, field_map=task.options.get("field_map"))
        return [PromptItem(task=task.name, prompt=r.prompt, responses=tuple(r.responses),
                           gold_scores=tuple(r.gold_scores), id=r.id) for r in records]
    records, _ = load_records(path, JudgmentExample, on_bad_row=on_bad_row, field_map=task.options.get("field_map"))
    return [PromptItem(task=task.name, prompt=r.prompt, responses=(r.response,), label=r.label,
                       reference=r.reference, id=r.id) for r in records]


def allocate(batch: int, ratios: list[float], credit: list[float] | None = None) -> list[int]:
    """Split `batch` into integer counts proportional to `ratios`.

    Largest remainder on `batch * share + credit`, where `credit` carries each task's rounding
    debt from earlier batches (updated in place): over many batches every task gets exactly its
    share, even when one batch cannot (10 prompts at 2:1:1)."""
    total = sum(ratios)
    credit = credit if credit is not None else [0.0] * len(ratios)
    exact = [batch * r / total + c for r, c in zip(ratios, credit)]
    counts = [max(int(np.floor(e)), 0) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: max(batch - sum(counts), 0)]:
        counts[i] += 1
    while sum(counts) > batch:  # credits can overshoot by rounding: trim the smallest remainders
        i = max((k for k in range(len(counts)) if counts[k] > 0), key=lambda k: counts[k] - exact[k])
        counts[i] -= 1
    for i in range(len(ratios)):
        credit[i] = exact[i] - counts[i]
    return counts


class TaskMixer:
    """Draws B PromptItems per call from the active tasks; `state()` / `load_state()` resume it."""

    def __init__(self, tasks, items: dict[str, list[PromptItem]], *, seed: int):
        self.tasks = list(tasks)
        self.items = items
        self.seed = seed
        self.drawn = {t.name: 0 for t in self.tasks}
        self.credit = {t.name: 0.0 for t in self.tasks}
        for t in self.tasks:
            if not items.get(t.name):
                raise ValueError(f"grpo.tasks: task {t.name!r} has no prompts (data={t.data!r})")

    def active(self, step: int) -> list:
        return [t for t in self.tasks if t.start_step <= step]

    @functools.lru_cache(maxsize=16)
    def _perm(self, task: str, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, sum(map(ord, task))]).permutation(len(self.items[task]))

    def draw(self, step: int, batch: int) -> list[PromptItem]:
        """Next `batch` items, split over the tasks active at `step` by ratio."""
        active = self.active(step)
        credit = [self.credit[t.name] for t in active]
        counts = allocate(batch, [t.ratio for t in active], credit)
        self.credit.update({t.name: c for t, c in zip(active, credit)})
        out = []
        for task, count in zip(active, counts):
            n = len(self.items[task.name])
            for _ in range(count):
                k = self.drawn[task.name]
                item = self.items[task.name][int(self._perm(task.name, k // n)[k % n])]
                out.append(shuffle_ranking(item, task, self.seed, "draw", k))  # a fresh order per draw
                self.drawn[task.name] = k + 1
        return out

    def state(self) -> dict:
        return {"drawn": dict(self.drawn), "credit": dict(self.credit)}

    def load_state(self, state: dict) -> None:
        self.drawn.update({k: int(v) for k, v in state.get("drawn", {}).items() if k in self.drawn})
        self.credit.update({k: float(v) for k, v in state.get("credit", {}).items() if k in self.credit})


def demonstration(item: PromptItem, task):
    """An SFT record showing the task's output format (SFT warm-up before RL), or None.

    verifiable: prompt -> gold answer; open: prompt -> reference; ranking: the ranking prompt ->
    `<best response> \\boxed{s1, ..., sN}` (template `listwise_tags`: `<think><best response></think>
    <score_1>s1</score_1> ...`) with gold scores mapped to the template's range: an answer the
    task's reward parses with the same template.
    """
    from jaxrl_rm.data.records import SFTRecord
    from jaxrl_rm.rewards.judge_source import prompt_as_text

    if task.kind == "verifiable" and item.answer:
        return SFTRecord(prompt=item.prompt, response=item.answer, id=item.id)
    if task.kind == "open" and item.reference:
        return SFTRecord(prompt=item.prompt, response=item.reference, id=item.id)
    if task.kind == "ranking" and item.gold_scores:
        template = ranking_template(task)
        gold = np.asarray(item.gold_scores, np.float64)
        span = gold.max() - gold.min()
        unit = (gold - gold.min()) / span if span > 0 else np.ones_like(gold)
        scores = np.rint(template.min_score + unit * (template.max_score - template.min_score)).astype(int)
        best = item.responses[int(np.argmax(gold))]
        messages = tuple(template.messages(prompt=prompt_as_text(item.prompt), responses=list(item.responses)))
        if template.format == "listwise_tags":
            answer = f"<think>{best}</think> " + " ".join(f"<score_{i}>{s}</score_{i}>" for i, s in enumerate(scores, 1))
        else:
            answer = f"{best} \\boxed{{{', '.join(map(str, scores))}}}"
        return SFTRecord(prompt=messages, response=answer, id=item.id)
    return None


def task_demonstrations(tasks, *, seed: int, size: int) -> dict[str, list]:
    """Each task's demonstrations (`demonstration`), `size` in all in proportion to the task
    ratios: task name -> SFTRecords."""
    total = sum(t.ratio for t in tasks)
    out = {}
    for t in tasks:
        items = load_task_items(t, split="train", seed=seed, size=max(1, int(size * t.ratio / total)))
        out[t.name] = [r for r in (demonstration(it, t) for it in items) if r is not None]
    return out


def warmup_records(demos: dict[str, list], *, seed: int) -> list:
    """`task_demonstrations` of every task mixed into one seeded shuffle (SFT warm-up data)."""
    out = [r for records in demos.values() for r in records]
    order = np.random.default_rng([seed, 41]).permutation(len(out))
    return [out[i] for i in order]

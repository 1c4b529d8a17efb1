"""Synthetic tasks a tiny transformer can learn on a CPU (seeded, deterministic).

`synthetic:<task>` in a config's data paths resolves here. Tasks produce the same record types as
the real loaders (`jaxrl_rm.data.records`), so every pipeline runs unchanged on them.

- `arithmetic`: `a+b=` with gold answer `a+b` (operand range configurable; train/eval operand
  pairs disjoint) -> `VerifiableProblem`;
  as SFT data the response is the answer.
- `paths`: `path:a>e,4:a:bd b:e d:b e:c=`: a walk through a graph's edges (`path_problems`): answers
  are easier to check than to produce; verified by `path_violations`, not exact match.
- `reverse`: `reverse:abcd=` with answer `dcba` (train/eval strings disjoint); `reverse_pairs` /
  `reverse_triples` / `reverse_ranking` are its preference data; `reverse_quads` its POLAR
  pretraining data (`ReversalPolicy`, `reverse_policy_pool`: rule-made reversal "models").
- style policies (`StylePolicy`, `style_policy_pool`): the POLAR world (`style_quads`,
  `style_triples`) and `style_pairs` / `style_open`, whose quality is the casing the prompt asks for.
- open-ended task (`open_ended` RL prompts, `open_pairs`, `open_triples`, `open_ranking` /
  `open_rankings`): plain instructions ("describe the rain") whose quality is a *hidden* scoring
  function, `hidden_quality` (closeness to a secret house style, `HiddenStyleScore`). Only data
  labelling (preference labels, gold scores, house-style references) and evaluation (reward type
  `hidden_quality`, a task's `options.eval_scorer`) see it; the prompts carry no hint of it.
"""

from __future__ import annotations

import re

import numpy as np

from jaxrl_rm.data.records import SFTRecord, VerifiableProblem

SYNTHETIC_PREFIX = "synthetic:"


def arithmetic_problems(n: int, *, seed: int = 0, max_operand: int = 50, ops: str = "+",
                        split: str = "train") -> list[VerifiableProblem]:
    """`n` problems like `37+45=` with answer `82`, operands in [0, max_operand).

    Train and eval problems are disjoint by construction: an operand pair belongs to the eval
    split iff `(7a + 13b) % 10 == 0` (10 % of pairs), so held-out accuracy is measured on pairs
    the policy never saw.
    """
    rng = np.random.default_rng([seed, 1])
    out: list[VerifiableProblem] = []
    while len(out) < n:
        a, b = (int(v) for v in rng.integers(0, max_operand, size=2))
        if ((7 * a + 13 * b) % 10 == 0) != (split == "eval"):
            continue
        op = ops[int(rng.integers(0, len(ops)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(VerifiableProblem(prompt=f"{a}{op}{b}=", answer=str(value), id=f"arith-{split}-{seed}-{len(out)}"))
    return out


def _held_out(text: str) -> bool:
    """Deterministic 10 % eval split by content (stable across Python runs, unlike hash())."""
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 10 == 0


def reverse_problems(n: int, *, seed: int = 0, alphabet: str = "abcdefgh", min_len: int = 3,
                     max_len: int = 6, split: str = "train") -> list[VerifiableProblem]:
    """`n` problems `reverse:abcd=` with answer `dcba`; train/eval strings disjoint (`_held_out`)."""
    rng = np.random.default_rng([seed, 2])
    out: list[VerifiableProblem] = []
    while len(out) < n:
        k = int(rng.integers(min_len, max_len + 1))
        word = "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), size=k))
        if _held_out(word) != (split == "eval"):
            continue
        out.append(VerifiableProblem(prompt=f"reverse:{word}=", answer=word[::-1], id=f"rev-{split}-{seed}-{len(out)}"))
    return out


PATH_PREFIX = "path:"


def path_problems(n: int, *, seed: int = 0, letters: str = "abcdef", min_len: int = 3, max_len: int = 5,
                  num_edges: int = 6, split: str = "train") -> list[VerifiableProblem]:
    """`n` path-finding problems, a task whose answers are easier to check than to produce.

    Prompt ``path:a>e,4:a:bd b:e d:b e:c=``: write a string of exactly 4 letters that starts with
    ``a``, ends with ``e``, and whose every adjacent pair is an edge of the graph given by its
    successor lists (``a:bd``: edges ``ab`` and ``ad``; letters without edges are left out), e.g.
    ``adbe``. Producing one is planning (each letter must leave a way to reach ``e`` in the letters
    left, past distractor edges); checking one is local (each pair's first letter's list holds the
    second or not, :func:`path_violations`). Each problem plants one walk of `min_len`..`max_len`
    letters (no letter followed by itself) and adds random distractor edges up to `num_edges`;
    the planted walk is the gold answer, but any valid walk is right (the ``path_check`` verifier,
    not exact match). Train/eval prompts disjoint (`_held_out`).
    """
    rng = np.random.default_rng([seed, 4])
    out: list[VerifiableProblem] = []
    while len(out) < n:
        length = int(rng.integers(min_len, max_len + 1))
        walk = [letters[int(rng.integers(len(letters)))]]
        while len(walk) < length:
            nxt = letters[int(rng.integers(len(letters) - 1))]
            walk.append(nxt if nxt < walk[-1] else letters[letters.index(nxt) + 1])  # never walk[-1]
        edges = {a + b for a, b in zip(walk, walk[1:])}
        while len(edges) < num_edges:
            a, b = (letters[int(i)] for i in rng.choice(len(letters), size=2, replace=False))
            edges.add(a + b)
        graph = " ".join(x + ":" + "".join(sorted(e[1] for e in edges if e[0] == x))
                         for x in letters if any(e[0] == x for e in edges))
        prompt = f"{PATH_PREFIX}{walk[0]}>{walk[-1]},{length}:{graph}="
        if _held_out(prompt) != (split == "eval"):
            continue
        out.append(VerifiableProblem(prompt=prompt, answer="".join(walk), id=f"path-{split}-{seed}-{len(out)}"))
    return out


_PATH_RE = re.compile(re.escape(PATH_PREFIX) + r"([a-z])>([a-z]),(\d+):((?:[a-z]:[a-z]* ?)+)=")


def parse_path_prompt(prompt: str) -> tuple[str, str, int, dict[str, str]] | None:
    """(start, end, length, successors: {letter: the letters it has edges to}) of a
    :func:`path_problems` prompt found in `prompt` (a chat-rendered or judge prompt may wrap it),
    or None when there is none."""
    m = _PATH_RE.search(prompt or "")
    if m is None:
        return None
    succ = dict(part.split(":") for part in m.group(4).split())
    return m.group(1), m.group(2), int(m.group(3)), succ


def path_violations(prompt: str, answer: str) -> list[str] | None:
    """The constraints of a path prompt that `answer` breaks (empty: a valid path), or None when
    `prompt` holds no path problem. Whitespace around the answer is ignored."""
    spec = parse_path_prompt(prompt)
    if spec is None:
        return None
    start, end, length, succ = spec
    a = answer.strip()
    broken = [f"edge {x}{y}" for x, y in zip(a, a[1:]) if y not in succ.get(x, "")]
    if not a or a[0] != start:
        broken.append("start")
    if not a or a[-1] != end:
        broken.append("end")
    if len(a) != length:
        broken.append("length")
    return broken


def path_written_check(prompt: str, answer: str) -> str:
    """A judge's written check of a path answer, one constraint at a time: each adjacent pair,
    its first letter's successor list copied from the prompt, and ``+`` (the second letter is in
    it) or ``x``; then start, end and length as ``<wanted><got>`` followed by ``=`` or ``x``:
    ``ab:bd+ bc:ex aa= cc= 33=``. Copying a list is what a small judge can do (find ``b:`` and
    copy what follows); the membership test is then local. Empty when `prompt` holds no path
    problem."""
    spec = parse_path_prompt(prompt)
    if spec is None:
        return ""
    start, end, length, succ = spec
    a = answer.strip()
    pairs = [f"{x}{y}:{succ.get(x, '')}" + ("+" if y in succ.get(x, "") else "x") for x, y in zip(a, a[1:])]
    ends = [(start, a[:1] or "_"), (end, a[-1:] or "_"), (str(length), str(len(a)))]
    return " ".join(pairs + [w + g + ("=" if w == g else "x") for w, g in ends])


TASKS = {"arithmetic": arithmetic_problems, "reverse": reverse_problems, "paths": path_problems}
#: The rule verifier (`rewards.verifiers.VERIFIERS`) that decides a task's answers where exact
#: match against the gold one would be wrong (SFT's held-out `accuracy`); others: exact_match.
TASK_VERIFIERS = {"paths": "path_check"}


def rule_label(prompt: str, answer: str, reference: str | None) -> bool:
    """Whether `answer` is right by the rule of the task `prompt` belongs to: the path check for a
    path problem (any valid walk), else exact match against `reference` (rule-made answers of the
    judge warm-up and refresh, `train.judge.with_corrupted_answers`)."""
    broken = path_violations(prompt, answer)
    return not broken if broken is not None else answer == reference


def sft_records(task: str, n: int, *, seed: int, split: str = "train") -> list[SFTRecord]:
    """SFT records (prompt -> gold answer) of a synthetic task."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; available: {sorted(TASKS)}")
    return [SFTRecord(prompt=p.prompt, response=p.answer, id=p.id) for p in TASKS[task](n, seed=seed, split=split)]


def parse_source(source: str) -> str | None:
    """`synthetic:arithmetic` -> `arithmetic`; a file path -> None."""
    return source[len(SYNTHETIC_PREFIX):] if source.startswith(SYNTHETIC_PREFIX) else None


def prompt_items(task: str, spec, *, split: str, seed: int, size: int):
    """RL prompts (`PromptItem`s) of a synthetic task for a `TaskSpec` (train / disjoint eval split).

    Verifiable tasks (`TASKS`) give prompt + gold answer; `reverse_ranking` gives N-way ranking
    items (URPO preference task; N from the task's `options.num_responses`, default 4);
    `style_open` gives `style_pairs` prompts (which ask for a casing) with the chosen answer as
    reference; `open_ended` gives plain open-ended prompts with a reference in the hidden house
    style (POLAR RFT / URPO instruction task; quality: `hidden_quality`), `open_ranking` N-way
    ranking items of such answers (gold = hidden scores).
    """
    from jaxrl_rm.data.records import PromptItem

    def ranking_items(records):
        return [PromptItem(task=spec.name, prompt=r.prompt, responses=tuple(r.responses),
                           gold_scores=tuple(r.gold_scores), id=r.id) for r in records]

    if task in TASKS:  # the gold answer doubles as the reference answer (POLAR RFT)
        return [PromptItem(task=spec.name, prompt=p.prompt, answer=p.answer, reference=p.answer, id=p.id)
                for p in TASKS[task](size, seed=seed, split=split)]
    if task == "reverse_ranking":
        try:
            records = reverse_rankings(size, seed=seed, split=split, num_responses=spec.options.get("num_responses", 4))
        except (TypeError, ValueError) as e:
            raise ValueError(f"grpo.tasks[{spec.name}].options.num_responses: {e}") from e
        return ranking_items(records)
    if task == "style_open":
        return [PromptItem(task=spec.name, prompt=p.prompt, reference=p.chosen, id=p.id)
                for p in style_pairs(size, seed=seed, split=split)]
    if task == "open_ended":
        return [PromptItem(task=spec.name, prompt=prompt, reference=reference, id=rid)
                for prompt, reference, rid in open_prompts(size, seed=seed, split=split)]
    if task == "open_ranking":
        return ranking_items(open_rankings(size, seed=seed, split=split))
    raise ValueError(f"unknown synthetic RL task {task!r}; available: "
                     f"{sorted(TASKS) + ['open_ended', 'open_ranking', 'reverse_ranking', 'style_open']}")


def reverse_rankings(n: int, *, seed: int, split: str = "train", num_responses: int | Sequence[int] = 4):
    """N-way ranking items for string reversal: the gold reversal and answers with 1, 2, ...
    random edits (`corrupt_answer`), shuffled; gold score = -(number of edits), so better answers
    score higher. Prompts from `reverse_problems` (train/eval disjoint). `num_responses`: N, or a
    list of sizes to draw N from per item (a judge that must rank lists of several sizes, e.g.
    pairs for pairwise / pivot judging); each N >= 2."""
    from jaxrl_rm.data.records import RankingItem

    sizes = [num_responses] if isinstance(num_responses, int) else [int(k) for k in num_responses]
    if not sizes or min(sizes) < 2:
        raise ValueError(f"reverse_rankings: num_responses must be >= 2 (or a list of such sizes), "
                         f"got {num_responses!r}")
    out = []
    for i, p in enumerate(reverse_problems(n, seed=seed, split=split)):
        rng = np.random.default_rng([seed, i, 31, split == "eval"])
        size = sizes[0] if len(sizes) == 1 else sizes[int(rng.integers(len(sizes)))]
        answers, edits = [p.answer], [0]
        for k in range(1, size):
            a = p.answer
            for _ in range(k):
                a = corrupt_answer(a, rng)
            answers.append(a)
            edits.append(k)
        order = rng.permutation(size)
        out.append(RankingItem(prompt=p.prompt, responses=tuple(answers[j] for j in order),
                               gold_scores=tuple(float(-edits[j]) for j in order), id=f"revrank-{split}-{seed}-{i}"))
    return out


# --- Reward-model tasks: preference pairs and a synthetic policy pool for POLAR -------------------
# `synthetic:<name>` in the reward-model pipelines (task rm_bt / polar_pretrain / polar_finetune)
# resolves through `RM_TASKS`; `synthetic:style:<k>` in a POLAR data-synthesis policy list is
# policy k of `style_policy_pool(STYLE_POOL_SIZE, seed=STYLE_POOL_SEED)`.
import dataclasses as _dc
from typing import Sequence

from jaxrl_rm.data.records import PolarQuad, PreferencePair, RankedTriple

STYLE_LETTERS = "abcdefghijklmnopqrstuvwxyz"
STYLE_SEPS = (" ", "-", "_", ".", ",", "+", "/", ":")
STYLE_CASES = ("lower", "upper", "title")
#: The fixed "world" of style policies the POLAR tasks draw from; the last STYLE_HELDOUT are never
#: trained on (held-out policies for evaluation).
STYLE_POOL_SEED, STYLE_POOL_SIZE, STYLE_HELDOUT = 20250705, 256, 16
_TOPICS = ("sea", "sun", "tree", "rock", "city", "road", "rain", "star", "fire", "moon", "bird", "lake",
           "snow", "wind", "corn", "gold", "salt", "iron", "wolf", "bear", "ship", "bell", "door", "lamp")


@_dc.dataclass(frozen=True)
class StylePolicy:
    """A synthetic policy: a sampling procedure with a recognisable style.

    A response is `n_words` words (uniform in the inclusive range) of `word_len` letters each,
    letters drawn from the policy's own 6-letter alphabet with probabilities `probs ** (1/T)`
    (renormalised), joined by `sep` and cased by `case`; the prompt's topic (its last word) is
    echoed at a random position, so answers depend on the prompt but the style does not.
    Two samples of one policy share alphabet, letter frequencies, separator, casing and lengths;
    two policies usually differ in several of these.
    """

    name: str
    letters: str
    probs: tuple[float, ...]
    sep: str
    case: str
    word_len: tuple[int, int]
    n_words: tuple[int, int]
    temperature: float = 1.0

    def sample(self, prompt, rng: np.random.Generator) -> str:
        p = np.asarray(self.probs, np.float64) ** (1.0 / self.temperature)
        p /= p.sum()
        letters = np.asarray(list(self.letters))
        n = int(rng.integers(self.n_words[0], self.n_words[1] + 1))
        words = ["".join(rng.choice(letters, size=int(rng.integers(self.word_len[0], self.word_len[1] + 1)), p=p))
                 for _ in range(n)]
        words.insert(int(rng.integers(0, n + 1)), _topic(prompt))
        cased = {"lower": str.lower, "upper": str.upper, "title": str.title}[self.case]
        return self.sep.join(cased(w) for w in words)

    def variant(self, *, seed: int) -> "StylePolicy":
        """A "near" policy: the same alphabet, letter frequencies and casing, another separator and
        word lengths."""
        rng = np.random.default_rng([seed, 7])
        seps = [s for s in STYLE_SEPS if s != self.sep]
        lo = int(rng.integers(2, 5))
        return _dc.replace(self, name=f"{self.name}~v{seed}", sep=str(rng.choice(seps)),
                           word_len=(lo, lo + int(rng.integers(0, 3))))


def _topic(prompt) -> str:
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    words = text.split()
    return words[-1].strip("?.!,").lower() if words else "it"


def style_policy_pool(n: int = STYLE_POOL_SIZE, *, seed: int = STYLE_POOL_SEED) -> list[StylePolicy]:
    """`n` style policies (see `StylePolicy`) drawn from a seed: alphabet (6 of 26 letters),
    Dirichlet(1) letter frequencies, separator (8 kinds), casing (3), word length (2-6), words
    per answer (2-6) and sampling temperature (0.7 / 1.0 / 1.5)."""
    pool = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        letters = "".join(sorted(rng.choice(list(STYLE_LETTERS), size=6, replace=False)))
        wl = int(rng.integers(2, 5))
        nw = int(rng.integers(2, 4))
        pool.append(StylePolicy(
            name=f"style{k}", letters=letters, probs=tuple(float(x) for x in rng.dirichlet(np.ones(6))),
            sep=str(rng.choice(STYLE_SEPS)), case=str(rng.choice(STYLE_CASES)),
            word_len=(wl, wl + int(rng.integers(0, 3))), n_words=(nw, nw + int(rng.integers(0, 3))),
            temperature=float(rng.choice([0.7, 1.0, 1.5]))))
    return pool


def style_prompts(n: int, *, seed: int) -> list[str]:
    """Short instruction-like prompts, e.g. `tell me about the rain`; distinct seeds, distinct draws
    from a small space (6 verbs x the topics), so two splits share prompts."""
    rng = np.random.default_rng([seed, 3])
    verbs = ("tell me about", "write about", "describe", "what is", "say something on", "a poem on")
    return [f"{verbs[int(rng.integers(len(verbs)))]} the {_TOPICS[int(rng.integers(len(_TOPICS)))]}"
            for _ in range(n)]


def pick_policy_pair(seed: int, index: int, n_policies: int, *,
                     must_include: Sequence[int] = ()) -> tuple[int, int]:
    """The (A, B) policy indices of prompt `index` of a POLAR data run: two different policies,
    uniformly, from `np.random.default_rng([seed, index])` (so each prompt's choice is independent
    of batching and resumption). With `must_include`, one of the two is drawn from that set."""
    rng = np.random.default_rng([seed, index, 11])
    if must_include:
        special = int(rng.choice(list(must_include)))
        other = int(rng.choice([k for k in range(n_policies) if k != special]))
        return (special, other) if rng.random() < 0.5 else (other, special)
    a, b = rng.choice(n_policies, size=2, replace=False)
    return int(a), int(b)


def style_quads(n: int, *, seed: int, split: str = "train") -> list[PolarQuad]:
    """POLAR pretraining quads from the style pool: for each prompt pick policies A != B, sample
    a1, a2 from A and b1 from B (`pick_policy_pair`).

    split="train": prompts from `seed`, policies from the first STYLE_POOL_SIZE - STYLE_HELDOUT.
    split="eval": prompts drawn with `seed + 10_000` (the prompt space is small: prompts repeat
    across splits, the responses are new draws) and every quad involves a
      held-out policy, as A or as B (the other one from the whole pool).
    """
    pool = style_policy_pool()
    n_train = STYLE_POOL_SIZE - STYLE_HELDOUT
    if split == "train":
        policies, held, pseed = pool[:n_train], (), seed
    else:
        policies, held, pseed = pool, tuple(range(n_train, STYLE_POOL_SIZE)), seed + 10_000
    prompts = style_prompts(n, seed=pseed)
    out = []
    for i, prompt in enumerate(prompts):
        a, b = pick_policy_pair(pseed, i, len(policies), must_include=held)
        rng = np.random.default_rng([pseed, i, 13])
        pa, pb = policies[a], policies[b]
        out.append(PolarQuad(prompt=prompt, a1=pa.sample(prompt, rng), a2=pa.sample(prompt, rng),
                             b1=pb.sample(prompt, rng), policy_a=pa.name, policy_b=pb.name,
                             id=f"style-{split}-{pseed}-{i}"))
    return out


def style_triples(n: int, *, seed: int, split: str = "train") -> list[RankedTriple]:
    """POLAR fine-tuning triples `reference ≻ chosen ≻ rejected` ranked by closeness to a target
    policy T: reference ~ T, chosen ~ a near variant of T (`StylePolicy.variant`: same letters,
    frequencies and casing, other separator and word lengths), rejected ~ another policy.
    Train: training policies and prompts from `seed`; eval: prompts and responses drawn with
    `seed + 10_000` (prompts repeat across splits: the prompt space is small),
    targets among all policies."""
    pool = style_policy_pool()
    n_train = STYLE_POOL_SIZE - STYLE_HELDOUT
    policies = pool[:n_train] if split == "train" else pool
    pseed = seed if split == "train" else seed + 10_000
    out = []
    for i, prompt in enumerate(style_prompts(n, seed=pseed)):
        t, o = pick_policy_pair(pseed, i, len(policies))
        rng = np.random.default_rng([pseed, i, 17])
        target = policies[t]
        near = target.variant(seed=pseed * 1_000_003 + i)
        out.append(RankedTriple(prompt=prompt, reference=target.sample(prompt, rng), chosen=near.sample(prompt, rng),
                                rejected=policies[o].sample(prompt, rng), id=f"style3-{split}-{pseed}-{i}"))
    return out


def style_pairs(n: int, *, seed: int, split: str = "train") -> list[PreferencePair]:
    """Bradley–Terry pairs with an instruction-following preference: the prompt asks for an answer
    `in capitals` or `in small letters` (the subset); chosen = an answer of a random pool policy in
    the requested casing, rejected = another policy's answer in the other casing. Which casing wins
    flips with the prompt, so no fixed style scores well: the RM must read the request."""
    pool = style_policy_pool()
    pseed = seed if split == "train" else seed + 10_000
    requests = (("in capitals", "upper"), ("in small letters", "lower"))
    out = []
    for i, prompt in enumerate(style_prompts(n, seed=pseed)):
        rng = np.random.default_rng([pseed, i, 19])
        (request, case), (_, other_case) = requests if rng.random() < 0.5 else requests[::-1]
        a, b = rng.choice(len(pool), size=2, replace=False)
        asked = f"{prompt}, {request}"
        chosen = _dc.replace(pool[int(a)], case=case).sample(prompt, rng)
        rejected = _dc.replace(pool[int(b)], case=other_case).sample(prompt, rng)
        out.append(PreferencePair(prompt=asked, chosen=chosen, rejected=rejected, subset=request.replace(" ", "_"),
                                  id=f"stylepair-{split}-{pseed}-{i}"))
    return out


def arithmetic_pairs(n: int, *, seed: int, split: str = "train", digits: int = 1) -> list[PreferencePair]:
    """`a+b=` with the correct sum preferred to a sum off by 1-3 (subset: `off_by_<k>`)."""
    pseed = seed if split == "train" else seed + 10_000
    rng = np.random.default_rng([pseed, 23])
    hi = 10 ** digits
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(0, hi, size=2))
        k = int(rng.integers(1, 4))
        wrong = a + b + (k if rng.random() < 0.5 or a + b < k else -k)
        out.append(PreferencePair(prompt=f"{a}+{b}=", chosen=str(a + b), rejected=str(wrong), subset=f"off_by_{k}",
                                  id=f"arithpair-{split}-{pseed}-{i}"))
    return out


#: Reward-model synthetic tasks: name -> (record type name, fn(n, *, seed, split) -> records).
RM_TASKS = {
    "style_quads": ("PolarQuad", style_quads),
    "style_triples": ("RankedTriple", style_triples),
    "style_pairs": ("PreferencePair", style_pairs),
    "arithmetic_pairs": ("PreferencePair", arithmetic_pairs),
}


def rm_records(task: str, n: int, *, seed: int, split: str = "train") -> list:
    """Records of a reward-model synthetic task (see `RM_TASKS`); split "eval" is held out."""
    if task not in RM_TASKS:
        raise ValueError(f"unknown synthetic reward-model task {task!r}; available: {sorted(RM_TASKS)}")
    return RM_TASKS[task][1](n, seed=seed, split=split)


# --- Judge-training samplers: a rule-based "other model" for off-policy J1 data -------------------
def corrupt_answer(answer: str, rng: np.random.Generator, *, alphabet: str = "abcdefgh") -> str:
    """`answer` with one random edit: substitute, delete, insert a character, or swap two adjacent
    ones (an edit that changes nothing is retried; the result is never `answer` nor empty)."""
    for _ in range(32):
        s = list(answer)
        op = int(rng.integers(4))
        i = int(rng.integers(len(s))) if s else 0
        if op == 0 and s:
            s[i] = alphabet[int(rng.integers(len(alphabet)))]
        elif op == 1 and len(s) > 1:
            del s[i]
        elif op == 2:
            s.insert(int(rng.integers(len(s) + 1)), alphabet[int(rng.integers(len(alphabet)))])
        elif op == 3 and len(s) > 1:
            j = min(i, len(s) - 2)
            s[j], s[j + 1] = s[j + 1], s[j]
        out = "".join(s)
        if out and out != answer:
            return out
    return answer + alphabet[0]


def corrupted_responses(problems, n_per_problem: int, *, seed: int, p_correct: float = 0.5,
                        alphabet: str = "abcdefgh") -> list[list[str]]:
    """For each problem, `n_per_problem` answers of a synthetic off-policy "model": the gold answer
    with probability `p_correct`, else `corrupt_answer(gold)`. Deterministic in `seed`."""
    rng = np.random.default_rng([seed, 29])
    return [[p.answer if rng.random() < p_correct else corrupt_answer(p.answer, rng, alphabet=alphabet)
             for _ in range(n_per_problem)] for p in problems]


# --- String-reversal preferences (RLHF-BT and POLAR-RFT of the reversal policy) ------------------
def reverse_pairs(n: int, *, seed: int, split: str = "train") -> list[PreferencePair]:
    """`reverse:abcd=`: the gold reversal preferred to an answer with 1-3 random edits
    (subset `edits_<k>`); prompts train/eval disjoint as in `reverse_problems`."""
    out = []
    for i, p in enumerate(reverse_problems(n, seed=seed, split=split)):
        rng = np.random.default_rng([seed, i, 37, split == "eval"])
        k = int(rng.integers(1, 4))
        wrong = p.answer
        for _ in range(k):
            wrong = corrupt_answer(wrong, rng)
        out.append(PreferencePair(prompt=p.prompt, chosen=p.answer, rejected=wrong, subset=f"edits_{k}",
                                  id=f"revpair-{split}-{seed}-{i}"))
    return out


def reverse_triples(n: int, *, seed: int, split: str = "train") -> list[RankedTriple]:
    """POLAR fine-tuning triples for reversal: reference = gold, chosen = gold or one edit away,
    rejected = two or three edits away (closer to the reference is better)."""
    out = []
    for i, p in enumerate(reverse_problems(n, seed=seed, split=split)):
        rng = np.random.default_rng([seed, i, 43, split == "eval"])
        chosen = p.answer if rng.random() < 0.5 else corrupt_answer(p.answer, rng)
        rejected = corrupt_answer(corrupt_answer(p.answer, rng), rng)
        if rng.random() < 0.5:
            rejected = corrupt_answer(rejected, rng)
        out.append(RankedTriple(prompt=p.prompt, reference=p.answer, chosen=chosen, rejected=rejected,
                                id=f"revtri-{split}-{seed}-{i}"))
    return out


#: The pool of rule-made reversal "models" that POLAR pretraining on reversal draws from
#: (`reverse_policy_pool`); the last REVERSE_HELDOUT are never trained on.
REVERSE_POOL_SEED, REVERSE_POOL_SIZE, REVERSE_HELDOUT = 20251207, 64, 8
_REVERSE_RULES = ("none", "drop_first", "drop_last", "double_first", "double_last", "swap_ends")


@_dc.dataclass(frozen=True)
class ReversalPolicy:
    """A rule-made reversal "model" with a recognisable way of being wrong.

    A sample is the gold reversal with the policy's systematic mistakes - its letter `mapping`
    (`mapping[i]` is written for `alphabet[i]`; about half the letters map to themselves) and its
    positional `rule` (drop / double the first or last character, swap the two ends, or none) -
    and then `Poisson(mean_edits)` random edits (`corrupt_answer`). Two samples of one policy
    differ only by those random edits; another policy's sample usually differs in the mapped
    letters and the rule as well. So POLAR pretraining on this pool teaches "how close is this
    answer to that one, character by character", over the answers a reversal RM will score.
    """

    name: str
    mapping: str
    rule: str
    mean_edits: float

    def sample(self, answer: str, rng: np.random.Generator, alphabet: str = "abcdefgh") -> str:
        s = "".join(self.mapping[alphabet.index(c)] if c in alphabet else c for c in answer)
        if len(s) > 1:
            s = {"none": s, "drop_first": s[1:], "drop_last": s[:-1], "double_first": s[0] + s,
                 "double_last": s + s[-1], "swap_ends": s[-1] + s[1:-1] + s[0]}[self.rule]
        for _ in range(min(int(rng.poisson(self.mean_edits)), 3)):
            s = corrupt_answer(s, rng, alphabet=alphabet)
        return s


def reverse_policy_pool(n: int = REVERSE_POOL_SIZE, *, seed: int = REVERSE_POOL_SEED,
                        alphabet: str = "abcdefgh") -> list[ReversalPolicy]:
    """`n` reversal policies (`ReversalPolicy`) drawn from a seed: each letter kept with
    probability 1/2, else mapped to another one; a positional rule (uniform over `_REVERSE_RULES`);
    mean random edits uniform in [0, 0.5]. Policy 0 is exact (the gold answer every time)."""
    pool = [ReversalPolicy(name="reverser0", mapping=alphabet, rule="none", mean_edits=0.0)]
    for k in range(1, n):
        rng = np.random.default_rng([seed, k])
        mapping = "".join(c if rng.random() < 0.5 else alphabet[(i + int(rng.integers(1, len(alphabet)))) % len(alphabet)]
                          for i, c in enumerate(alphabet))
        pool.append(ReversalPolicy(name=f"reverser{k}", mapping=mapping, rule=str(rng.choice(_REVERSE_RULES)),
                                   mean_edits=float(rng.uniform(0.0, 0.5))))
    return pool


def reverse_quads(n: int, *, seed: int, split: str = "train") -> list[PolarQuad]:
    """POLAR pretraining quads on the reversal prompts (`reverse_problems`, the `split`'s own
    words): policies A != B from `reverse_policy_pool` (`pick_policy_pair`), a1, a2 ~ A, b1 ~ B.
    split="train" uses the first REVERSE_POOL_SIZE - REVERSE_HELDOUT policies; split="eval" the
    held-out words, and every quad involves a held-out policy (as A or B)."""
    pool = reverse_policy_pool()
    n_train = REVERSE_POOL_SIZE - REVERSE_HELDOUT
    if split == "train":
        policies, held = pool[:n_train], ()
    else:
        policies, held = pool, tuple(range(n_train, REVERSE_POOL_SIZE))
    out = []
    for i, p in enumerate(reverse_problems(n, seed=seed, split=split)):
        a, b = pick_policy_pair(seed, i, len(policies), must_include=held)
        rng = np.random.default_rng([seed, i, 47, split == "eval"])
        pa, pb = policies[a], policies[b]
        out.append(PolarQuad(prompt=p.prompt, a1=pa.sample(p.answer, rng), a2=pa.sample(p.answer, rng),
                             b1=pb.sample(p.answer, rng), policy_a=pa.name, policy_b=pb.name,
                             id=f"revquad-{split}-{seed}-{i}"))
    return out


RM_TASKS.update(reverse_pairs=("PreferencePair", reverse_pairs), reverse_triples=("RankedTriple", reverse_triples),
                reverse_quads=("PolarQuad", reverse_quads))


# --- Open-ended tasks: quality = a hidden "house style" -------------------------------------------
# The policy is asked plain questions (`style_prompts`: "describe the rain"); what makes an answer
# good is a house style that appears nowhere in the prompts. Only data labelling (`open_pairs`,
# `open_triples`, `open_rankings`, the references of `open_ended`) and evaluation (the
# `hidden_quality` reward source, `options.eval_scorer`) call `hidden_quality`.
import itertools as _it

#: Seed of the house style (a `StylePolicy` drawn like a pool policy, from its own seed).
HOUSE_STYLE_SEED = 20250918
#: `hidden_quality` reads at most this many characters of a response (bounded cost on any input).
HIDDEN_MAX_CHARS = 4096
_WORD_RE = re.compile(r"[^\W\d_]+")  # runs of letters (any script); everything else separates words
_CASES = {"lower": str.islower, "upper": str.isupper,
          "title": lambda w: w[:1].isupper() and (len(w) == 1 or w[1:].islower())}


def house_style(seed: int = HOUSE_STYLE_SEED) -> StylePolicy:
    """The hidden house style: a `StylePolicy` drawn from `seed` as `style_policy_pool` draws its
    policies (alphabet and letter frequencies, separator, casing, word lengths, words per answer)."""
    return _dc.replace(style_policy_pool(1, seed=seed)[0], name="house")


@_dc.dataclass(frozen=True)
class HiddenStyleScore:
    """Hidden quality of an open-ended answer: closeness to a house style, in [0, 1].

    The response (its first `HIDDEN_MAX_CHARS` characters) is split into words (runs of letters)
    and separators (what lies between two words). The prompt's topic is its last word (as
    `StylePolicy.sample` echoes it); "content words" are the words other than the topic. Components,
    each in [0, 1]:

    - `letters`: Bhattacharyya coefficient Σ_l sqrt(p_l q_l) between the letter frequencies p of
      the content words (lower-cased; letters outside the house alphabet only dilute p) and the
      house's sampling distribution q (`probs ** (1/T)`, renormalised);
    - `separator`: share of separators equal to the house separator, where text before the first
      or after the last word counts as one more (wrong) separator each;
    - `casing`: share of words in the house casing (lower / upper / title);
    - `word_length`: mean over content words of 0.5 ** d, d = distance of the word's length to
      the house's word-length range;
    - `word_count`: 0.5 ** d, d = distance of the number of content words to the house's range;
    - `topic`: 1 if the topic occurs as a word (any casing), else 0.

    score = Σ weight_c · component_c with the weights below (summing to 1). An answer without
    words scores 0; the house style's own samples score ≈ 0.98 (min ≈ 0.93), its near variants
    (`StylePolicy.variant`) ≈ 0.78, random pool policies ≈ 0.45.
    Deterministic, pure Python + numpy, and never raises on a string (nor on an odd prompt: its
    topic is then empty and `topic` scores 0).
    """

    house: StylePolicy
    weights: tuple[tuple[str, float], ...] = (("letters", 0.30), ("separator", 0.15), ("casing", 0.15),
                                              ("word_length", 0.15), ("word_count", 0.10), ("topic", 0.15))

    def components(self, prompt, response) -> dict[str, float]:
        """The six components (see the class docstring) of `response` to `prompt`."""
        names = [k for k, _ in self.weights]
        text = response[:HIDDEN_MAX_CHARS] if isinstance(response, str) else ""
        matches = list(_WORD_RE.finditer(text))
        if not matches:
            return dict.fromkeys(names, 0.0)
        words = [m.group() for m in matches]
        try:
            topic = _topic(prompt)
        except Exception:  # noqa: BLE001 - any prompt shape: no topic
            topic = ""
        content = [w for w in words if w.lower() != topic]
        seps = [text[a.end():b.start()] for a, b in _it.pairwise(matches)]
        seps += [s for s in (text[:matches[0].start()], text[matches[-1].end():]) if s]
        house = self.house
        out = {"letters": self._letters("".join(content).lower()),
               "separator": sum(s == house.sep for s in seps) / len(seps) if seps else 0.0,
               "casing": sum(bool(_CASES[house.case](w)) for w in words) / len(words),
               "word_length": float(np.mean([0.5 ** _gap(len(w), house.word_len) for w in content]))
               if content else 0.0,
               "word_count": 0.5 ** _gap(len(content), house.n_words) if content else 0.0,
               "topic": float(bool(topic) and any(w.lower() == topic for w in words))}
        return {k: float(out[k]) for k in names}

    def _letters(self, chars: str) -> float:
        if not chars:
            return 0.0
        q = np.asarray(self.house.probs, np.float64) ** (1.0 / self.house.temperature)
        q /= q.sum()
        p = np.asarray([chars.count(c) for c in self.house.letters], np.float64) / len(chars)
        return float(min(1.0, np.sqrt(p * q).sum()))

    def total(self, components: dict[str, float]) -> float:
        """The score in [0, 1] of `components`: their weighted sum."""
        return float(min(1.0, max(0.0, sum(w * components[k] for k, w in self.weights))))

    def __call__(self, prompt, response) -> float:
        """The hidden score in [0, 1] of `response` to `prompt`."""
        return self.total(self.components(prompt, response))


def _gap(x: int, bounds: tuple[int, int]) -> int:
    """Distance of `x` to the inclusive range `bounds` (0 inside)."""
    return max(bounds[0] - x, 0, x - bounds[1])


#: The hidden scorer of the open-ended tasks (see `HiddenStyleScore`).
HIDDEN_SCORE = HiddenStyleScore(house_style())


def hidden_quality(prompt, response) -> float:
    """Hidden quality in [0, 1] of `response` to `prompt` (`HIDDEN_SCORE`): for data labelling and
    evaluation only; never part of what the policy sees."""
    return HIDDEN_SCORE(prompt, response)


def _open_split(seed: int, split: str) -> tuple[list[StylePolicy], int]:
    """Policies and prompt seed of an open-ended split: training policies and `seed` (train), the
    whole pool and `seed + 10_000` (eval; prompts repeat across splits, the answers are new draws)."""
    pool = style_policy_pool()
    return (pool[:STYLE_POOL_SIZE - STYLE_HELDOUT], seed) if split == "train" else (pool, seed + 10_000)


def _open_candidate(rng: np.random.Generator, policies: Sequence[StylePolicy]) -> StylePolicy:
    """A policy whose answers spread over the hidden score's range: the house style (1/6), a near
    variant of it (1/6: another separator and word lengths), or a pool policy (2/3) that takes the
    house's casing, separator, and alphabet with its frequencies, each with probability 1/3."""
    house = HIDDEN_SCORE.house
    u = rng.random()
    if u < 1 / 6:
        return house
    if u < 1 / 3:
        return house.variant(seed=int(rng.integers(2**31)))
    policy = policies[int(rng.integers(len(policies)))]
    changes = {}
    if rng.random() < 1 / 3:
        changes["case"] = house.case
    if rng.random() < 1 / 3:
        changes["sep"] = house.sep
    if rng.random() < 1 / 3:
        changes.update(letters=house.letters, probs=house.probs, temperature=house.temperature)
    return _dc.replace(policy, **changes) if changes else policy


def _scored_answers(prompt: str, k: int, rng: np.random.Generator, policies, *, tries: int = 16):
    """`k` answers of `_open_candidate` policies with pairwise distinct hidden scores (> 1e-6
    apart) -> (answers, scores), or None after `tries` draws with a tie."""
    for _ in range(tries):
        answers = [_open_candidate(rng, policies).sample(prompt, rng) for _ in range(k)]
        scores = [hidden_quality(prompt, a) for a in answers]
        s = np.sort(scores)
        if (np.diff(s) > 1e-6).all():
            return answers, scores
    return None


def _open_records(n: int, seed: int, split: str, salt: int, make) -> list:
    """Up to `n` records `make(prompt, rng, policies, id_tag)` (None: skip) over open-ended prompts."""
    policies, pseed = _open_split(seed, split)
    out: list = []
    for i, prompt in enumerate(style_prompts(2 * n + 16, seed=pseed)):
        if len(out) == n:
            break
        rec = make(prompt, np.random.default_rng([pseed, i, salt]), policies, f"{split}-{pseed}-{len(out)}")
        if rec is not None:
            out.append(rec)
    return out


def open_pairs(n: int, *, seed: int, split: str = "train") -> list[PreferencePair]:
    """Preference pairs on plain open-ended prompts (`style_prompts`), labelled by `hidden_quality`:
    two answers of `_open_candidate` policies, chosen = the higher hidden score (ties are redrawn).
    subset `gap_small` / `gap_medium` / `gap_large`: score difference < 0.1 / < 0.3 / larger.
    Splits as `_open_split` (prompts repeat across splits)."""
    def make(prompt, rng, policies, tag):
        got = _scored_answers(prompt, 2, rng, policies)
        if got is None:
            return None
        (a, b), (sa, sb) = got
        gap = abs(sa - sb)
        subset = "gap_small" if gap < 0.1 else "gap_medium" if gap < 0.3 else "gap_large"
        chosen, rejected = (a, b) if sa > sb else (b, a)
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, subset=subset, id=f"openpair-{tag}")

    return _open_records(n, seed, split, 47, make)


def open_triples(n: int, *, seed: int, split: str = "train") -> list[RankedTriple]:
    """POLAR fine-tuning triples for the open-ended task: reference = a house-style sample,
    chosen / rejected = two `_open_candidate` answers ordered by `hidden_quality` (ties redrawn)."""
    def make(prompt, rng, policies, tag):
        reference = HIDDEN_SCORE.house.sample(prompt, rng)
        got = _scored_answers(prompt, 2, rng, policies)
        if got is None:
            return None
        (a, b), (sa, sb) = got
        chosen, rejected = (a, b) if sa > sb else (b, a)
        return RankedTriple(prompt=prompt, reference=reference, chosen=chosen, rejected=rejected,
                            id=f"opentri-{tag}")

    return _open_records(n, seed, split, 53, make)


def open_rankings(n: int, *, seed: int, split: str = "train", num_responses: int = 4):
    """N-way ranking items for the open-ended task: `num_responses` `_open_candidate` answers,
    gold_scores = their hidden scores (pairwise distinct)."""
    from jaxrl_rm.data.records import RankingItem

    def make(prompt, rng, policies, tag):
        got = _scored_answers(prompt, num_responses, rng, policies)
        if got is None:
            return None
        answers, scores = got
        return RankingItem(prompt=prompt, responses=tuple(answers), gold_scores=tuple(scores), id=f"openrank-{tag}")

    return _open_records(n, seed, split, 59, make)


def open_prompts(n: int, *, seed: int, split: str = "train"):
    """RL prompts of the open-ended task -> [(prompt, reference, id)]: plain `style_prompts`
    instructions, reference = a house-style sample (for POLAR RFT / SFT warm-up / win rate)."""
    def make(prompt, rng, policies, tag):
        return prompt, HIDDEN_SCORE.house.sample(prompt, rng), f"open-{tag}"

    return _open_records(n, seed, split, 61, make)


RM_TASKS.update(open_pairs=("PreferencePair", open_pairs), open_triples=("RankedTriple", open_triples))

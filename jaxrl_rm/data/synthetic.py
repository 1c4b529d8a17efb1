"""Synthetic tasks a tiny transformer can learn on a CPU (seeded, deterministic).

`synthetic:<task>` in a config's data paths resolves here. Tasks produce the same record types as
the real loaders (`jaxrl_rm.data.records`), so every pipeline runs unchanged on them.

- `arithmetic`: `a+b=` with gold answer `a+b` (digits configurable) -> `VerifiableProblem`;
  as SFT data the response is the answer.
"""

from __future__ import annotations

import numpy as np

from jaxrl_rm.data.records import SFTRecord, VerifiableProblem

SYNTHETIC_PREFIX = "synthetic:"


def arithmetic_problems(n: int, *, seed: int = 0, digits: int = 2, ops: str = "+") -> list[VerifiableProblem]:
    """`n` problems like `37+45=` with answer `82`; distinct seeds give disjoint-ish draws."""
    rng = np.random.default_rng([seed, 1])
    hi = 10 ** digits
    out = []
    for i in range(n):
        a, b = (int(v) for v in rng.integers(0, hi, size=2))
        op = ops[int(rng.integers(0, len(ops)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(VerifiableProblem(prompt=f"{a}{op}{b}=", answer=str(value), id=f"arith-{seed}-{i}"))
    return out


TASKS = {"arithmetic": arithmetic_problems}


def sft_records(task: str, n: int, *, seed: int) -> list[SFTRecord]:
    """SFT records (prompt -> gold answer) of a synthetic task."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; available: {sorted(TASKS)}")
    return [SFTRecord(prompt=p.prompt, response=p.answer, id=p.id) for p in TASKS[task](n, seed=seed)]


def parse_source(source: str) -> str | None:
    """`synthetic:arithmetic` -> `arithmetic`; a file path -> None."""
    return source[len(SYNTHETIC_PREFIX):] if source.startswith(SYNTHETIC_PREFIX) else None

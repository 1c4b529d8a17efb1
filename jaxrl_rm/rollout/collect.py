"""The one call every sampler user makes: token-id prompts in, a `GenerationResult` out, through
the static batch (`sampling.generate`) or the slot engine (`rollout.engine.SlotEngine`), with
throughput statistics either way.

    collector = RolloutCollector(engine="slots", max_prompt_len=P, max_new_tokens=T,
                                 temperature=1.0, stop_token_ids=[eos], pad_id=pad)
    result = collector.generate(model, prompts, num_samples=G, seed=s)   # rows i*G + j
    collector.stats                                                       # RolloutStats

Why both engines: `static` decodes every row until the last one stops, so a long-tailed batch
idles most rows; it shards rows over a mesh and is what the library's RL results were measured
with. `slots` (continuous batching, one copy of each prompt's K/V for its G samples) keeps the
slots busy and stores each prompt once (on a mesh: a slot group per data shard). Both draw sample j of prompt i at step t
from the same uniform (a function of the seed, the row and t), so they return the same samples up
to float rounding of the logits.

`occupancy` is the fraction of decode work that produced a kept token: useful tokens over rows x
decode steps run (static: every row runs until the longest stops) or over slot-steps (slots).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from jaxrl_rm.models.transformer import kv_cache_dtype_name
from jaxrl_rm.parallel.rules import batch_shards
from jaxrl_rm.sampling import generate

ENGINES = ("static", "slots")


@dataclasses.dataclass
class RolloutStats:
    """One `generate` call: useful (kept) completion tokens, wall seconds, tokens/s, occupancy, and
    prompt tokens prefilled (static: every prompt's; slots: a prompt reused or a shared prefix is
    prefilled once)."""

    engine: str = "static"
    useful_tokens: int = 0
    wall_s: float = 0.0
    occupancy: float = 0.0
    prefill_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @staticmethod
    def step_metrics(calls: Sequence["RolloutStats"]) -> dict[str, float]:
        """An RL step's sampler throughput over its calls (sampling rounds): `rollout/tokens_per_s`
        (all kept tokens over all wall time) and `rollout/occupancy` (the calls' mean)."""
        wall, tokens = sum(c.wall_s for c in calls), sum(c.useful_tokens for c in calls)
        return {"rollout/tokens_per_s": tokens / wall if wall > 0 else 0.0,
                "rollout/occupancy": float(np.mean([c.occupancy for c in calls]))}


class RolloutCollector:
    """Sampling settings fixed per run; the model (its current weights) passed per call.

    engine: `static` | `slots`. num_slots (slots): sample slots decoded together (0: one per
    row of the first call, rounded up to a power of two). steps_per_sync (slots): decode steps
    per host round-trip. mesh: the static engine shards rows over its ("data", "fsdp") axes; the
    slot engine runs one slot group per data shard (`SlotEngine(mesh=)`). kv_cache_dtype: None /
    "compute" (the model's compute dtype) or "int8" (int8 K/V with a per-(token, head) scale),
    either engine. max_prefix_len (slots): prompts of a call that share a prefix of at least 16
    tokens read it from one shared prefix slot, prefilled once (`SlotEngine(max_prefix_len=)`;
    0: off). Other arguments as in `sampling.generate`.
    """

    def __init__(self, *, engine: str = "static", max_prompt_len: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 stop_token_ids: Sequence[int] = (), pad_id: int = 0, mesh=None, num_slots: int = 0,
                 steps_per_sync: int = 16, kv_cache_dtype=None, max_prefix_len: int = 0):
        if engine not in ENGINES:
            raise ValueError(f"rollout engine must be one of {list(ENGINES)}, got {engine!r}")
        self.engine, self.mesh = engine, mesh
        self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
        self.sampling = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        self.stop_token_ids, self.pad_id = list(stop_token_ids), int(pad_id)
        self.num_slots, self.steps_per_sync = int(num_slots), int(steps_per_sync)
        self.kv_cache_dtype = kv_cache_dtype_name(kv_cache_dtype)
        self.max_prefix_len = int(max_prefix_len)
        self._engines: dict[tuple[bool, int], object] = {}  # (greedy, G) -> SlotEngine, built on first use
        self.stats = RolloutStats(engine=engine)

    def generate(self, model, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int,
                 greedy: bool = False):
        """`num_samples` completions of each prompt (token ids; a longer prompt keeps its last
        `max_prompt_len` tokens) -> `GenerationResult` (row i*num_samples + j = sample j of prompt
        i, `unfiltered_logprobs` filled); `self.stats` describes the call."""
        prompts = [list(p)[-self.max_prompt_len:] or [self.pad_id] for p in prompts]
        t0 = time.perf_counter()
        if self.engine == "static":
            res = generate(model, prompts, num_samples=num_samples, max_new_tokens=self.max_new_tokens,
                           stop_token_ids=self.stop_token_ids, seed=seed, greedy=greedy, mesh=self.mesh,
                           return_unfiltered_logprobs=True, max_prompt_len=self.max_prompt_len,
                           truncate_prompt="left", pad_id=self.pad_id, kv_cache_dtype=self.kv_cache_dtype,
                           **self.sampling)
            lengths = np.asarray(res.lengths)
            steps = int(lengths.max()) if lengths.size else 0
            occupancy = float(lengths.sum()) / max(lengths.size * steps, 1)
            prefill_tokens = sum(len(p) for p in prompts)
        else:
            from jaxrl_rm.rollout.engine import SlotEngine

            engine = self._engines.get((greedy, num_samples))
            if engine is None:
                slots = self.num_slots or 1 << max(len(prompts) * num_samples - 1, 0).bit_length()
                if self.mesh is not None:  # at least one slot per data shard (a slot group each)
                    slots = max(slots, batch_shards(self.mesh))
                # G samples per prompt: slots / G prompt slots keep every slot busy, 1/G of the cache
                # that a copy of the prompt per sample would take
                engine = self._engines[(greedy, num_samples)] = SlotEngine(
                    model, num_slots=slots, num_prompt_slots=max(1, slots // num_samples),
                    max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens, greedy=greedy,
                    stop_token_ids=self.stop_token_ids, pad_id=self.pad_id, steps_per_sync=self.steps_per_sync,
                    kv_cache_dtype=self.kv_cache_dtype, mesh=self.mesh, max_prefix_len=self.max_prefix_len,
                    **self.sampling)
            engine.model = model  # the engine reads the weights at each run
            res = engine.generate(prompts, num_samples=num_samples, seed=int(seed))
            lengths = np.asarray(res.lengths)
            occupancy, prefill_tokens = engine.stats.occupancy, engine.stats.prefill_tokens
        self.stats = RolloutStats(engine=self.engine, useful_tokens=int(lengths.sum()),
                                  wall_s=time.perf_counter() - t0, occupancy=float(occupancy),
                                  prefill_tokens=int(prefill_tokens))
        return res

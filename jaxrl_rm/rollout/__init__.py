"""Rollout collection: requests in, rollouts out, a continuous-batching slot engine behind it.

GRPO (training and evaluation) and the generative judges sample through `RolloutCollector`
(`collect`): the static batch of `sampling.generate`, or the slot engine (`grpo.rollout_engine:
slots`), with tokens/s and occupancy either way. The engine alone:

    engine = SlotEngine(model, num_slots=32, max_prompt_len=512, max_new_tokens=512,
                        temperature=1.0, stop_token_ids=[eos])
    result = engine.run([Request(prompt_ids, num_samples=G), ...], seed=step)  # GenerationResult
    engine.stats                                                            # EngineStats

`result` has the layout of `sampling.generate`'s (row i*G + j = sample j of request i), so GRPO,
the judges and evaluation can call either. See `engine` (scheduling) and `step` (device programs,
shared prompt KV cache).
"""

from jaxrl_rm.rollout.collect import RolloutCollector, RolloutStats
from jaxrl_rm.rollout.engine import EngineStats, SlotEngine
from jaxrl_rm.rollout.requests import Request

__all__ = ["EngineStats", "Request", "RolloutCollector", "RolloutStats", "SlotEngine"]

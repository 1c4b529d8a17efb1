"""Reward shaping terms added to source rewards (DAPO)."""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths: np.ndarray, truncated: np.ndarray, *, max_new_tokens: int, buffer: int,
                     penalty: float = 1.0) -> np.ndarray:
    """DAPO soft overlong punishment, in tokens; same shape as `lengths`, float32, <= 0.

    With L_max = max_new_tokens and L_cache = buffer:
      0                                   if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
      -1                                  if the response was cut off (|y| > L_max)
    times `penalty`. `truncated` marks responses stopped by the length limit (no stop token).
    buffer=0 turns the shaping off.
    """
    lengths = np.asarray(lengths, np.float32)
    if buffer <= 0:
        return np.zeros_like(lengths)
    start = max_new_tokens - buffer
    ramp = np.where(lengths > start, (start - lengths) / buffer, 0.0)
    out = np.where(np.asarray(truncated, bool), -1.0, np.clip(ramp, -1.0, 0.0))
    return (penalty * out).astype(np.float32)

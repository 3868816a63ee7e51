"""Pure load balancers over an index space ``0..n-1``; the caller supplies weights per pick.

Rules:
- A weight ``<= 0`` means "not eligible"; weights may be fractional (slow start ramps them).
- ``pick`` returns an index, or -1 when nothing is eligible.  Each pick is O(n) in pool size
  and allocates nothing.
- SmoothWeightedRoundRobin is nginx's smooth weighted round robin: every eligible ``i`` gets
  ``current[i] += w[i]``, the largest ``current`` wins (ties: lowest index) and pays back the
  total eligible weight.  Ineligible entries have their ``current`` zeroed so a returning
  target starts without stale credit or debt.  A change of pool size resets the state.
- LeastRequestP2C is Envoy's least_request with power of two choices: two distinct eligible
  indices are drawn uniformly from the injected ``random.Random``; the one with the lower
  ``(in_flight + 1) / weight`` wins (Envoy's weighted form with active_request_bias = 1; the
  ``+ 1`` makes idle targets compare by weight).  Ties go to the first drawn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin."""

    __slots__ = ("_current",)

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0 (got {n})")
        self._current: list[float] = [0.0] * n

    def pick(self, weights: Sequence[float]) -> int:
        """Index of the chosen target, or -1 if all weights are <= 0."""
        current = self._current
        if len(weights) != len(current):
            current = self._current = [0.0] * len(weights)
        total = 0.0
        best = -1
        best_current = 0.0
        for i, w in enumerate(weights):
            if w <= 0:
                current[i] = 0.0
                continue
            c = current[i] + w
            current[i] = c
            total += w
            if best < 0 or c > best_current:
                best = i
                best_current = c
        if best >= 0:
            current[best] -= total
        return best

    def __repr__(self) -> str:
        state = ", ".join(f"{c:g}" for c in self._current)
        return f"SmoothWeightedRoundRobin(current=[{state}])"


class LeastRequestP2C:
    """Envoy's least_request with power of two choices, weight-aware."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, weights: Sequence[float], in_flight: Sequence[int]) -> int:
        """Index of the less loaded of two random eligible targets; -1 if none is eligible."""
        eligible = 0
        only = -1
        for i, w in enumerate(weights):
            if w > 0:
                eligible += 1
                only = i
        if eligible <= 1:
            return only
        rank_a = self._rng.randrange(eligible)
        rank_b = self._rng.randrange(eligible - 1)
        if rank_b >= rank_a:
            rank_b += 1
        a = b = -1
        rank = 0
        for i, w in enumerate(weights):
            if w > 0:
                if rank == rank_a:
                    a = i
                elif rank == rank_b:
                    b = i
                if a >= 0 and b >= 0:
                    break
                rank += 1
        # b wins only if strictly less loaded: (f_b + 1) / w_b < (f_a + 1) / w_a.
        if (in_flight[b] + 1) * weights[a] < (in_flight[a] + 1) * weights[b]:
            return b
        return a

    def __repr__(self) -> str:
        return f"LeastRequestP2C(rng={type(self._rng).__name__})"

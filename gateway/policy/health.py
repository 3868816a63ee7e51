"""Active health-check state for one target (consecutive counting, like pingora's observe_health).

Rules:
- An observation that agrees with the current state clears the streak.
- An observation that disagrees extends the streak; when the streak reaches the threshold for
  that direction the state flips and the streak clears:

      state      observation  threshold to flip
      healthy    failure      unhealthy_threshold
      unhealthy  success      healthy_threshold

- ``on_success`` / ``on_failure`` return True exactly when that observation flipped the state.
"""

from __future__ import annotations


class HealthState:
    """Healthy/unhealthy with hysteresis from consecutive observations."""

    __slots__ = ("_healthy_threshold", "_streak", "_unhealthy_threshold", "healthy")

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int, healthy: bool = True) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError(
                f"thresholds must be >= 1 (healthy={healthy_threshold}, unhealthy={unhealthy_threshold})"
            )
        self._healthy_threshold = healthy_threshold
        self._unhealthy_threshold = unhealthy_threshold
        self.healthy: bool = healthy
        self._streak = 0

    def on_success(self) -> bool:
        """Record a passed check; True if it made the target healthy."""
        return self._observe(True, self._healthy_threshold)

    def on_failure(self) -> bool:
        """Record a failed check; True if it made the target unhealthy."""
        return self._observe(False, self._unhealthy_threshold)

    def _observe(self, ok: bool, threshold: int) -> bool:
        if ok == self.healthy:
            self._streak = 0
            return False
        self._streak += 1
        if self._streak < threshold:
            return False
        self.healthy = ok
        self._streak = 0
        return True

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        need = self._unhealthy_threshold if self.healthy else self._healthy_threshold
        return f"HealthState({state}, streak={self._streak}/{need})"

"""The Attempt permit: every end reaches each policy once, and a second end is refused."""

from __future__ import annotations

import pytest

from gateway.cluster.pool import Pool
from gateway.config.model import CircuitBreakerConfig, Passive, Target, Upstream
from gateway.pipeline.attempt import Attempt, AttemptEnded


def pool_of(n: int = 2, **kw: object) -> Pool:
    targets = tuple(Target(address=f"127.0.0.1:{9000 + i}") for i in range(n))
    cfg = Upstream(
        targets=targets,
        circuit_breaker=CircuitBreakerConfig(min_requests=1, failure_ratio=0.5, window=10.0),
        passive=Passive(consecutive_failures=1, on_5xx=True),
        **kw,  # type: ignore[arg-type]
    )
    return Pool("p", cfg, clock=lambda: 1000.0)


def armed(pool: Pool, index: int = 0, circuit: bool = False) -> Attempt:
    a = Attempt()
    a.arm(pool, pool.targets[index], circuit)
    return a


def acquired(pool: Pool) -> Attempt:
    assert pool.circuit is not None and pool.circuit.try_acquire()
    return armed(pool, circuit=True)


def test_an_attempt_holds_the_targets_in_flight_slot_until_it_ends() -> None:
    pool = pool_of()
    a = acquired(pool)
    assert pool.targets[0].in_flight == 1
    a.answered(200, 0.01)
    assert pool.targets[0].in_flight == 0


@pytest.mark.parametrize("end", ["answered", "failed", "retried", "abandoned"])
def test_a_second_end_is_refused(end: str) -> None:
    pool = pool_of()
    a = acquired(pool)
    first = {
        "answered": lambda: a.answered(200, 0.01),
        "failed": lambda: a.failed(0.01),
        "retried": lambda: a.retried(False),
        "abandoned": a.abandoned,
    }
    first[end]()
    for again in first.values():
        with pytest.raises(AttemptEnded):
            again()
    assert pool.targets[0].in_flight == 0  # given back once, not once per call


def test_failed_opens_the_circuit_and_ejects() -> None:
    pool = pool_of()
    acquired(pool).failed(0.01)
    assert pool.circuit is not None and pool.circuit.state == "open"
    assert pool.targets[0].ejected


def test_answered_5xx_counts_for_circuit_and_ejection() -> None:
    pool = pool_of()
    acquired(pool).answered(503, 0.01)
    assert pool.circuit is not None and pool.circuit.state == "open"
    assert pool.targets[0].ejected


def test_retried_passes_the_circuit_permit_on_unjudged() -> None:
    """A retry ejects the failed target but leaves the circuit to judge the next attempt."""
    pool = pool_of()
    a = acquired(pool)
    assert a.retried(False) is True
    assert pool.targets[0].ejected
    assert pool.circuit is not None and pool.circuit.state == "closed"
    a.arm(pool, pool.targets[1], circuit=True)  # the same permit, armed for the next try
    b = a
    assert pool.targets[1].in_flight == 1
    b.answered(200, 0.01)
    assert pool.circuit.state == "closed" and pool.targets[1].in_flight == 0


def test_abandoned_releases_the_circuit_permit_unjudged() -> None:
    pool = pool_of()
    a = acquired(pool)
    a.abandoned()
    assert pool.targets[0].in_flight == 0
    assert pool.circuit is not None and pool.circuit.state == "closed"
    assert not pool.targets[0].ejected


def test_arming_an_attempt_that_has_not_ended_is_refused() -> None:
    pool = pool_of()
    a = armed(pool)
    with pytest.raises(AttemptEnded):
        a.arm(pool, pool.targets[1], False)
    assert pool.targets[1].in_flight == 0
    a.answered(200, 0.01)
    gen = a.generation
    a.arm(pool, pool.targets[1], False)  # ended: armed again for the next try
    assert a.generation == gen + 1 and pool.targets[1].in_flight == 1

"""A target's pool of idle keep-alive connections: LIFO reuse, its bound, and the idle sweep."""

from __future__ import annotations

from gateway.cluster.pool import Pooled, TargetState

# Pooled connections here are the base the pool knows (UpstreamProtocol derives from it).


def target(max_idle: int = 4) -> TargetState:
    return TargetState("api", "127.0.0.1:9001", 1, max_idle)


def test_the_most_recently_used_connection_is_reused_first() -> None:
    t = target()
    a, b = Pooled(), Pooled()
    t.put_idle(a, 1.0)
    t.put_idle(b, 2.0)
    assert t.take_idle() is b and t.take_idle() is a and t.take_idle() is None


def test_a_connection_the_backend_closed_while_idle_is_skipped() -> None:
    t = target()
    a, b = Pooled(), Pooled()
    t.put_idle(a, 1.0)
    t.put_idle(b, 2.0)
    b.closed = True
    assert t.take_idle() is a
    assert not t.idle


def test_the_pool_is_bounded_and_a_drained_target_keeps_nothing() -> None:
    t = target(max_idle=2)
    conns = [Pooled() for _ in range(3)]
    for c in conns:
        t.put_idle(c, 1.0)
    assert [c.closed for c in conns] == [False, False, True]
    t.drained = True
    late = Pooled()
    t.put_idle(late, 2.0)
    assert late.closed and len(t.idle) == 2


def test_the_sweep_closes_the_oldest_and_the_dead_and_keeps_the_fresh_in_order() -> None:
    t = target(max_idle=8)
    old1, dead, old2, fresh1, fresh2 = (Pooled() for _ in range(5))
    for c, at in ((old1, 1.0), (dead, 5.0), (old2, 2.0), (fresh1, 10.0), (fresh2, 11.0)):
        t.put_idle(c, at)
    dead.closed = True
    t.close_idle_older_than(9.0)
    assert old1.closed and old2.closed
    assert t.idle == [fresh1, fresh2] and not fresh1.closed and not fresh2.closed
    t.close_idle_older_than(9.0)  # nothing stale: nothing changes
    assert t.idle == [fresh1, fresh2]
    t.close_all_idle()
    assert not t.idle and fresh1.closed and fresh2.closed

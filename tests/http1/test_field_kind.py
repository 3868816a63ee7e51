"""Request field names by kind: the remembered, shape-filtered lookup agrees with the rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import http1

CASES = [
    (b"Host", http1.FIELD_HOST),
    (b"HOST", http1.FIELD_HOST),
    (b"content-length", http1.FIELD_CONTENT_LENGTH),
    (b"Transfer-Encoding", http1.FIELD_TRANSFER_ENCODING),
    (b"Connection", http1.FIELD_CONNECTION),
    (b"Expect", http1.FIELD_EXPECT),
    (b"Upgrade", http1.FIELD_UPGRADE),
    (b"X-Forwarded-For", http1.FIELD_FORWARDED_FOR),
    (b"Keep-Alive", http1.FIELD_DROPPED),
    (b"Proxy-Authorization", http1.FIELD_DROPPED),
    (b"TE", http1.FIELD_DROPPED),
    (b"Trailer", http1.FIELD_DROPPED),
    (b"X-Forwarded-Proto", http1.FIELD_DROPPED),
    (b"x-forwarded-host", http1.FIELD_DROPPED),
    (b"X_Forwarded_For", http1.FIELD_UNDERSCORED),
    (b"content_length", http1.FIELD_UNDERSCORED),
    (b"Transfer_Encoding", http1.FIELD_UNDERSCORED),
    (b"User-Agent", http1.FIELD_PLAIN),
    (b"Accept", http1.FIELD_PLAIN),  # the shape of Expect's length, not its letter
    (b"Hosts", http1.FIELD_PLAIN),
    (b"Hose", http1.FIELD_PLAIN),  # Host's shape, not Host
    (b"X-Forwarded-Fox", http1.FIELD_PLAIN),
    (b"Te-", http1.FIELD_PLAIN),
    (b"x", http1.FIELD_PLAIN),
]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_field_kinds(name: bytes, kind: int) -> None:
    assert http1.field_kind_of(name) == kind
    assert http1.field_kind(name) == kind
    assert http1.field_kind(name) == kind  # remembered: the same answer


SPECIAL = sorted(http1.SPECIAL_REQUEST | http1.SPECIAL_REQUEST_UNDERSCORED)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.sampled_from(SPECIAL).flatmap(
            lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
                lambda up: bytes(c - 32 if u and 97 <= c <= 122 else c for c, u in zip(n, up, strict=True))
            )
        ),
        st.binary(min_size=1, max_size=24),
    )
)
def test_the_fast_lookup_agrees_with_the_rule_in_any_case(name: bytes) -> None:
    assert http1.field_kind(name) == http1.field_kind_of(name)


def test_remembered_names_are_bounded() -> None:
    """Random names (an attacker's) are classified without being stored past the bound."""
    for i in range(http1.FIELD_KINDS_MAX + 100):
        assert http1.field_kind(b"c%013d" % i) == http1.FIELD_PLAIN  # Content-Length's shape: looked up
    assert http1.field_kinds_remembered() <= http1.FIELD_KINDS_MAX
    assert http1.field_kind(b"cOnNeCtIoN") == http1.FIELD_CONNECTION  # past the bound: still right

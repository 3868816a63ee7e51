"""Request field names by kind: the remembered, shape-filtered lookup agrees with the rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy import http

CASES = [
    (b"Host", http.FIELD_HOST),
    (b"HOST", http.FIELD_HOST),
    (b"content-length", http.FIELD_CONTENT_LENGTH),
    (b"Transfer-Encoding", http.FIELD_TRANSFER_ENCODING),
    (b"Connection", http.FIELD_CONNECTION),
    (b"Expect", http.FIELD_EXPECT),
    (b"Upgrade", http.FIELD_UPGRADE),
    (b"X-Forwarded-For", http.FIELD_FORWARDED_FOR),
    (b"Keep-Alive", http.FIELD_DROPPED),
    (b"Proxy-Authorization", http.FIELD_DROPPED),
    (b"TE", http.FIELD_DROPPED),
    (b"Trailer", http.FIELD_DROPPED),
    (b"X-Forwarded-Proto", http.FIELD_DROPPED),
    (b"x-forwarded-host", http.FIELD_DROPPED),
    (b"X_Forwarded_For", http.FIELD_UNDERSCORED),
    (b"content_length", http.FIELD_UNDERSCORED),
    (b"Transfer_Encoding", http.FIELD_UNDERSCORED),
    (b"User-Agent", http.FIELD_PLAIN),
    (b"Accept", http.FIELD_PLAIN),  # the shape of Expect's length, not its letter
    (b"Hosts", http.FIELD_PLAIN),
    (b"Hose", http.FIELD_PLAIN),  # Host's shape, not Host
    (b"X-Forwarded-Fox", http.FIELD_PLAIN),
    (b"Te-", http.FIELD_PLAIN),
    (b"x", http.FIELD_PLAIN),
]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_field_kinds(name: bytes, kind: int) -> None:
    assert http.field_kind_of(name) == kind
    assert http.field_kind(name) == kind
    assert http.field_kind(name) == kind  # remembered: the same answer


SPECIAL = sorted(http.SPECIAL_REQUEST | http.SPECIAL_REQUEST_UNDERSCORED)


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
    assert http.field_kind(name) == http.field_kind_of(name)


def test_remembered_names_are_bounded() -> None:
    """Random names (an attacker's) are classified without being stored past the bound."""
    for i in range(http.FIELD_KINDS_MAX + 100):
        assert http.field_kind(b"c%013d" % i) == http.FIELD_PLAIN  # Content-Length's shape: looked up
    assert http.field_kinds_remembered() <= http.FIELD_KINDS_MAX
    assert http.field_kind(b"cOnNeCtIoN") == http.FIELD_CONNECTION  # past the bound: still right

"""The request-target scan: where the query starts, and which targets are refused (fragment, "..")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import http1

CASES = [
    (b"/", 1),
    (b"/api/v1/users/12345", 19),
    (b"/api/v1/users?id=3&x=y", 13),
    (b"/static/app.min.js", 18),
    (b"/a/./b", 6),  # a single-dot segment: the backend's business, not a traversal
    (b"/a/..b/c", 8),  # ".." inside a segment name is not a dot segment
    (b"/a/b..", 6),
    (b"/search?q=/../x", 7),  # ".." in the query is data
    (b"/?", 1),
    (b"*", 1),
    (b"/a#frag", -1),
    (b"/a?x=1#frag", -1),
    (b"/a#/../smuggled", -1),
    (b"/a/../../etc/passwd", -1),
    (b"/..", -1),
    (b"/a/..", -1),
    (b"/a/..?x", -1),
    (b"/../", -1),
]


@pytest.mark.parametrize(("url", "expected"), CASES)
def test_query_start_finds_the_query_and_refuses_fragments_and_dot_segments(
    url: bytes, expected: int
) -> None:
    assert http1.query_start(url) == expected
    assert http1.query_start_find(url) == expected


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"/", b".", b"..", b"?", b"#", b"a", b"%2e", b"=", b"x/"]), max_size=12))
def test_the_compiled_scan_and_the_find_scan_agree(parts: list[bytes]) -> None:
    url = b"/" + b"".join(parts)
    assert http1.query_start(url) == http1.query_start_find(url)

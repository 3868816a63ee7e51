"""Fuzzing the proxy socket: a bounded hypothesis property test (test_fuzz_requests) and a long campaign.

`python -m tests.fuzz.campaign --examples 100000` runs the long one outside CI (atheris when
installed, else hypothesis with a large max_examples).
"""

"""gateway: a reverse-proxy load-shedding gateway."""

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the data plane runs as mypyc-compiled C (built at install by setup.py) or pure Python.

    Shown on start and in `gateway_build_info`, so an operator sees a slower pure-Python install
    (no compiler when it was installed) instead of guessing from the throughput.
    """
    from gateway import http1  # compiled with the rest of the data plane, or not at all

    return http1.COMPILED

"""gateway: a reverse-proxy load-shedding gateway."""

__version__ = "0.1.0"

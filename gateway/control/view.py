"""What the control plane sees of a running gateway process: a few operations, not the `App`.

Why a view: the admin API and the metrics collector sit between the data plane they read and the
process that assembles everything (`gateway.process.app`). Handing them the whole `App` made
process ↔ control an import cycle and let them reach into anything; this is all they use, and
the process builds it (`App.control_view`). They also read the data-plane types the runtime
holds (`Runtime`, `Pool`, `TargetState`, `gateway.observe.stats`), never `gateway.process`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.pipeline.routing import Runtime


@dataclass(frozen=True, slots=True)
class GatewayView:
    """The running gateway as the admin API and /metrics may use it."""

    # The current runtime snapshot: routes, pools and targets, and the effective config
    # (`runtime().config`). A getter, since a reload swaps it.
    runtime: Callable[[], Runtime]
    # Re-read the configuration file → (ok, errors); logs `reloaded` / `reload_failed` itself.
    reload: Callable[[], tuple[bool, list[str]]]
    # The file the configuration came from (None: built from text, nothing to reload).
    config_path: Path | None = None
    # This process's label among `workers: N` in merged metrics (None: its pid).
    worker: str | None = None

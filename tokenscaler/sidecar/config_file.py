"""The sidecar's own ``--config``, re-read when it changes and on SIGHUP, where it is in force.

Without ``--limits-url`` the file *is* the sidecar's config: its keys, tiers and static
limits. :class:`SidecarConfigFile` checks the file's ``(mtime_ns, size, inode)``
(:func:`tokenscaler.config.file_stamp`, as the controller's re-read does) every ``poll_s``
seconds, and at once on :meth:`request` (SIGHUP). A valid new config is applied through
``apply`` (the proxy's identities and the static limits follow it; requests in flight finish
as they started); a file that cannot be read or does not validate is logged as
``tokenscaler validate`` prints it, counted (``tokenscaler_sidecar_config_reload_failures_total``)
and the last good config stays in force. With ``--limits-url`` the file is only a bootstrap
until the controller's first document: its changes are not watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from tokenscaler.config import file_stamp, load_config
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.validation import ConfigError

log = logging.getLogger(__name__)


class SidecarConfigFile:
    def __init__(
        self,
        path: str | Path,
        config: TokenPoolsConfig,
        pool: str,
        apply: Callable[[TokenPoolsConfig], None],
        *,
        poll_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.shown = str(path)
        self.config = config
        self.pool = pool
        self.apply = apply
        self.poll_s = poll_s
        self.failures = 0
        self.last_error: str | None = None
        self._stamp = file_stamp(self.path)
        self._wake = asyncio.Event()

    def request(self) -> None:
        """Re-read now, changed or not (SIGHUP)."""
        self._stamp = None
        self._wake.set()

    def check(self) -> bool:
        """Re-read the file if it changed; True when a new config was applied."""
        stamp = file_stamp(self.path)
        if stamp is not None and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = load_config(self.path)
            new.pool(self.pool)
        except ConfigError as e:
            return self._refused(e.lines())
        except KeyError:
            return self._refused([f"{self.shown}: pools: no pool {self.pool!r} (this sidecar's --pool)"])
        if new == self.config:
            return False
        self.config = new
        self.last_error = None
        self.apply(new)
        return True

    def _refused(self, lines: list[str]) -> bool:
        self.failures += 1
        self.last_error = "; ".join(lines)
        for line in lines:
            log.error("%s", line)
        log.error("config %s refused: the last good config stays in force", self.shown)
        return False

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            self.check()

"""File mode reloads: the controller re-reads its ``--config`` file when it changes, and on SIGHUP.

:class:`ConfigReloader` checks the file's ``(mtime_ns, size, inode)``
(:func:`tokenscaler.config.file_stamp`, as the scrape config's re-read does) every
``poll_s`` seconds, so an in-place write and an atomic rename over the file are both seen;
:meth:`ConfigReloader.request` (SIGHUP) re-reads it at once, changed or not. Then:

* a valid config that differs from the one in force is applied
  (:meth:`tokenscaler.control.loop.Controller.set_config`: one log line per change, the
  config generation one higher, planned from the next interval on);
* a valid config equal to the one in force changes nothing (no new generation);
* a file that cannot be read or does not validate is refused: the errors are logged as
  ``tokenscaler validate`` prints them (one line each, naming the file), the last good
  config stays in force, ``tokenscaler_config_reload_failures_total`` counts it,
  ``tokenscaler_config_last_reload_success`` reads 0 and ``/readyz`` shows the error
  (:meth:`ConfigReloader.status`) until a re-read succeeds.

Write the new file beside the old one and rename it over: a file read halfway through an
in-place write may fail validation (it is refused, and the complete file is read at the
next check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from tokenscaler.config import FileStamp, file_stamp, load_config
from tokenscaler.control.loop import Controller
from tokenscaler.core.validation import ConfigError

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 1.0


class ConfigReloader:
    """Keeps ``controller`` on the config in ``path`` (its config must have been read from it;
    ``stamp``: the file's :func:`~tokenscaler.config.file_stamp` taken before that read, so a
    write in between is seen; by default, taken now)."""

    def __init__(
        self,
        path: str | Path,
        controller: Controller,
        *,
        poll_s: float = DEFAULT_POLL_S,
        stamp: FileStamp | None = None,
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s ({poll_s}) must be > 0")
        self.path = Path(path)
        self.shown = str(path)  # as the operator wrote it, as `tokenscaler validate` names it
        self.controller = controller
        self.poll_s = poll_s
        self.last_error: str | None = None  # why the last re-read was refused; None once one succeeds
        self._stamp = stamp if stamp is not None else file_stamp(self.path)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` says of the config: its generation, the last refusal, the source."""
        return {"generation": self.controller.generation, "last_reload_error": self.last_error, "source": "file"}

    def request(self) -> None:
        """Re-read the file at once, changed or not (SIGHUP)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def check(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); True when a new config was applied."""
        stamp = file_stamp(self.path)
        if not force and (stamp is None or stamp == self._stamp):
            return False
        self._stamp = stamp  # taken before the read: a write during it is seen at the next check
        try:
            config = await asyncio.to_thread(load_config, self.shown)
        except ConfigError as e:
            self._refused(e)
            return False
        metrics = self.controller.metrics
        metrics.config_last_reload_success.set(1)
        if self.last_error is not None:
            log.info("config %s is valid again", self.shown)
        self.last_error = None
        changes = self.controller.set_config(config)
        if changes:
            log.info("config %s re-read: generation %d, %d change(s)", self.shown, self.controller.generation,
                     len(changes))  # fmt: skip
        else:
            log.info("config %s re-read: nothing changed (generation %d)", self.shown, self.controller.generation)
        return bool(changes)

    def _refused(self, e: ConfigError) -> None:
        metrics = self.controller.metrics
        metrics.config_reload_failures.inc()
        metrics.config_last_reload_success.set(0)
        lines = e.lines()
        self.last_error = "; ".join(lines)
        log.error("config %s cannot be used (%d error(s)): generation %d stays in force", self.shown, len(lines),
                  self.controller.generation)  # fmt: skip
        for line in lines:
            log.error("%s", line)

    async def run(self) -> None:
        """Check every ``poll_s`` seconds, and at once on :meth:`request`, until :meth:`stop`."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            if self._stop.is_set():
                break
            forced = self._wake.is_set()
            self._wake.clear()
            if forced:
                log.info("re-reading config %s (SIGHUP)", self.shown)
            try:
                await self.check(force=forced)
            except Exception:  # a bug here must not stop the watch: the config in force stays
                log.exception("re-reading config %s failed unexpectedly", self.shown)

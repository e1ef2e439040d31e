"""List+watch of one collection (a CR kind, or the key Secrets), kept as a name -> object cache
(a client-go reflector).

A :class:`Reflector` lists (taking the list's resourceVersion), then watches from the last
version it saw; a watch the server ends is re-opened from there, a 410 Gone (the version
was compacted away) re-lists at once, and any other failure re-lists after a bounded
exponential backoff (:class:`Backoff`). It runs in a thread of its own (the ``kubernetes``
client blocks) and calls ``on_change(snapshot)`` after every list and every event that
changed the cache. :func:`apply_event` is the pure part.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenscaler.kube.client import ApiError, Gone

log = logging.getLogger("tokenscaler.kube.watch")

Snapshot = dict[str, dict[str, Any]]


class Collection(Protocol):
    """What a :class:`Reflector` calls: :class:`~tokenscaler.kube.client.CustomObjects` or
    :class:`~tokenscaler.kube.client.Secrets`."""

    plural: str

    def list(self) -> tuple[list[dict[str, Any]], str]: ...

    def watch(self, resource_version: str, timeout_s: int, read_timeout_s: float) -> Iterator[dict[str, Any]]: ...

    def abort_watch(self) -> None: ...


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _rv(obj: Mapping[str, Any]) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return None if rv is None else str(rv)


def apply_event(cache: Snapshot, event: Mapping[str, Any]) -> tuple[Snapshot, str | None, bool]:
    """``cache`` after one watch event: (new cache, resourceVersion to resume from, changed).

    ADDED/MODIFIED put the object, DELETED removes it, BOOKMARK only moves the version;
    anything else is ignored. The input cache is not modified.
    """
    kind = event.get("type")
    obj = event.get("object") or event.get("raw_object") or {}
    if not isinstance(obj, Mapping):
        return cache, None, False
    rv = _rv(obj)
    if kind == "BOOKMARK":
        return cache, rv, False
    name = _name(obj)
    if kind in ("ADDED", "MODIFIED"):
        if cache.get(name) == obj:
            return cache, rv, False
        return {**cache, name: dict(obj)}, rv, True
    if kind == "DELETED":
        if name not in cache:
            return cache, rv, False
        out = dict(cache)
        del out[name]
        return out, rv, True
    return cache, rv, False


@dataclass
class Backoff:
    """Bounded exponential backoff with jitter: initial, x factor per failure, never above ``cap_s``."""

    initial_s: float = 0.2
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.1
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        base = min(self.cap_s, self.initial_s * self.factor**self.failures)
        self.failures += 1
        return min(self.cap_s, base * (1 + self.jitter * self.rng.random()))

    def reset(self) -> None:
        self.failures = 0


class Reflector:
    """Keeps ``objects`` (name -> object) in step with one collection."""

    def __init__(
        self,
        objects: Collection,
        on_change: Callable[[Snapshot], None],
        *,
        watch_timeout_s: int = 300,
        read_timeout_s: float = 330.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.objects = objects
        self.on_change = on_change
        self.watch_timeout_s = watch_timeout_s
        self.read_timeout_s = read_timeout_s
        self.backoff = backoff or Backoff()
        self.cache: Snapshot = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.lists = 0  # how many times it listed (1 + re-lists)
        self.watches = 0  # how many watch requests it opened
        self.errors: list[str] = []  # last few failures, for logs and tests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.objects.plural}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.objects.abort_watch()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _note(self, message: str) -> None:
        self.errors = [*self.errors[-9:], message]

    def _list(self) -> None:
        items, rv = self.objects.list()
        self.lists += 1
        self.cache = {_name(o): o for o in items}
        self.resource_version = rv
        self.synced.set()
        self.on_change(dict(self.cache))

    def _watch(self) -> None:
        assert self.resource_version is not None
        self.watches += 1
        for event in self.objects.watch(self.resource_version, self.watch_timeout_s, self.read_timeout_s):
            if event.get("type") == "ERROR":
                status = (event.get("object") or event.get("raw_object") or {}).get("code")
                raise ApiError(f"watch {self.objects.plural}", int(status or 0), "error event")
            self.cache, rv, changed = apply_event(self.cache, event)
            if rv:
                self.resource_version = rv
            if changed:
                self.on_change(dict(self.cache))
            self.backoff.reset()
            if self._stop.is_set():
                return

    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()  # returns when the server ends the watch: re-open from the last version
            except Gone as e:
                self._note(str(e))
                log.info("%s: resourceVersion %s gone; listing again", self.objects.plural, self.resource_version)
                need_list = True
            except ApiError as e:
                if self._stop.is_set():  # stop() cut the watch on purpose
                    return
                self._note(str(e))
                need_list = True
                delay = self.backoff.next_delay()
                log.warning("%s: %s; listing again in %.1fs", self.objects.plural, e, delay)
                self._stop.wait(delay)
            except Exception as e:  # never let the thread die: a bug here must not freeze the config
                self._note(f"{type(e).__name__}: {e}")
                log.exception("%s: reflector failed; listing again", self.objects.plural)
                need_list = True
                self._stop.wait(self.backoff.next_delay())

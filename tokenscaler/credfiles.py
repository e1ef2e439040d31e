"""Secret files that can change under a running process: bearer-token files and their watcher.

A Kubernetes Secret mounted as a volume (or a cert-manager certificate) is replaced on disk
while the pod runs; these helpers notice by the file's ``(device, inode, mtime, size)``
signature, which changes on an in-place rewrite and on the atomic rename or symlink swap
the kubelet does, and re-read it then. Nothing here ever puts a secret's *content* in an
exception, a log line or a ``repr``: errors name the file and what is wrong with it.

Token file format: one token per line; blank lines and lines starting with ``#`` are
ignored; surrounding whitespace is stripped. A token has no inner whitespace. Several
tokens may be listed so a rotation can overlap: add the new one, roll the clients, remove
the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

Signature = tuple[int, int, int, int]
_UNSET = object()


class SecretFileError(ValueError):
    """A secret file that cannot be used; the message names the file, never its content."""


def signature(path: str | Path) -> Signature | None:
    """What changes when the file is rewritten or replaced; ``None`` if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def read_tokens(path: str | Path, what: str = "token file") -> tuple[str, ...]:
    """The tokens of a token file, in order; :class:`SecretFileError` when there are none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise SecretFileError(f"cannot read the {what} {str(path)!r}: {reason}") from None
    tokens: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise SecretFileError(f"{what} {str(path)!r} line {number}: a token has no inner whitespace")
        tokens.append(line)
    if not tokens:
        raise SecretFileError(f"the {what} {str(path)!r} holds no token (one per line; '#' starts a comment)")
    return tuple(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenFile:
    """The tokens of a file, re-read when the file changes.

    :meth:`refresh` costs one ``stat`` when nothing changed, so callers may call it on every
    request. A file that becomes unreadable or empty keeps the last good tokens (and logs
    a warning once per change), so a botched write does not lock every client out; a
    successful rewrite replaces them at once, so a removed token stops working.
    """

    def __init__(self, path: str | Path, what: str = "token file") -> None:
        self.path = Path(path)
        self.what = what
        self._signature = signature(self.path)
        self._tokens = read_tokens(self.path, what)  # raises at start: a missing file is a startup error
        self._digests = tuple(_digest(t) for t in self._tokens)
        self._warned_for: object = _UNSET
        self.reloads = 0

    def __repr__(self) -> str:  # never the tokens
        return f"TokenFile({str(self.path)!r}, {len(self._tokens)} token(s))"

    @property
    def count(self) -> int:
        return len(self._tokens)

    @property
    def first(self) -> str:
        """The token a client sends (the first one listed)."""
        return self._tokens[0]

    def changed(self) -> bool:
        """Whether the file changed since it was last read (one ``stat``; nothing is read)."""
        sig = signature(self.path)
        return sig != self._signature and sig != self._warned_for

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when the tokens were replaced."""
        sig = signature(self.path)
        if sig == self._signature or sig == self._warned_for:
            return False
        try:
            tokens = read_tokens(self.path, self.what)
        except SecretFileError as e:
            log.warning("%s; the previous %d token(s) stay in force", e, len(self._tokens))
            self._warned_for = sig  # once per state of the file
            return False
        self._signature = sig
        self._warned_for = _UNSET
        changed = tokens != self._tokens
        self._tokens = tokens
        self._digests = tuple(_digest(t) for t in tokens)
        if changed:
            self.reloads += 1
            log.info("%s %s re-read: %d token(s) in force", self.what, self.path, len(tokens))
        return changed

    def accepts(self, candidate: str) -> bool:
        """Whether ``candidate`` is one of the tokens, in time independent of where they differ.

        Both sides are hashed first, so the comparison also does not leak the tokens'
        lengths, and every token is compared (no early exit on a match).
        """
        probe = _digest(candidate)
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(probe, d)
        return ok

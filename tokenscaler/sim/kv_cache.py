"""The paged KV cache's block pool: free blocks and the prefix cache, as vLLM V1 keeps them.

The pool counts blocks; it does not name them. A request holds ``blocks`` blocks (the
engine keeps that number per running request): some are *cached* (identified by the hash
of the prompt prefix they hold, shared by every request with that prefix, reference
counted) and the rest are *private*. Freed cached blocks keep their contents and stay
findable until their space is needed: they count as free (``vllm:kv_cache_usage_perc``
does not count them) and are evicted least recently freed first, the tail of a freed
request before its head (vLLM frees a request's blocks in reverse order).

Invariant (checked by the engine tests)::

    free == num_blocks - sum(private blocks of live requests) - #(hashes with refcount > 0)
    0 <= #(evictable hashes) <= free
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class BlockPool:
    """Free-block accounting with an optional prefix cache of reference-counted blocks."""

    __slots__ = ("_evictable", "_refs", "free", "num_blocks")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free = num_blocks
        """Blocks not held by any live request (evictable cached blocks included)."""
        self._refs: dict[int, int] = {}
        """Cached block hash -> number of live requests holding it (0: evictable)."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks no request holds, least recently freed first."""

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (``vllm:kv_cache_usage_perc``)."""
        return 1.0 - self.free / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix (held or evictable)."""
        return len(self._refs)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> tuple[int, int]:
        """Leading blocks of ``hashes`` (at most ``max_blocks``) found in the cache.

        Returns ``(hits, evictable_hits)``: taking the hits costs ``evictable_hits`` free blocks.
        """
        hits = evictable = 0
        refs = self._refs
        for h in hashes[:max_blocks]:
            rc = refs.get(h)
            if rc is None:
                break
            hits += 1
            if rc == 0:
                evictable += 1
        return hits, evictable

    def touch(self, hashes: Sequence[int]) -> None:
        """Take a reference on cached blocks found by :meth:`lookup`."""
        refs = self._refs
        for h in hashes:
            rc = refs[h]
            if rc == 0:
                del self._evictable[h]
                self.free -= 1
            refs[h] = rc + 1

    def allocate(self, n: int) -> None:
        """Take ``n`` private blocks, evicting cached ones whose space is needed."""
        if n > self.free:
            raise ValueError(f"cannot allocate {n} blocks, {self.free} free")
        self.free -= n
        while len(self._evictable) > self.free:
            h, _ = self._evictable.popitem(last=False)
            del self._refs[h]

    def register(self, h: int) -> bool:
        """Make one of a request's private blocks, now full of prompt ``h``, a cached block.

        Returns False (the block stays private) when another block already holds ``h``.
        """
        if h in self._refs:
            return False
        self._refs[h] = 1
        return True

    def release(self, held: Sequence[int], private: int) -> None:
        """Give back a request's blocks: ``held`` cached blocks (in prefix order) and ``private`` others."""
        refs = self._refs
        for h in reversed(held):
            rc = refs[h] - 1
            refs[h] = rc
            if rc == 0:
                self._evictable[h] = None
                self.free += 1
        self.free += private

    def check(self, private_blocks: int) -> None:
        """Assert the invariant given the live requests' private block total (tests)."""
        held = sum(1 for rc in self._refs.values() if rc > 0)
        assert self.free == self.num_blocks - private_blocks - held, (self.free, private_blocks, held)
        assert 0 <= len(self._evictable) <= self.free, (len(self._evictable), self.free)
        assert all(self._refs[h] == 0 for h in self._evictable)
        assert sum(1 for rc in self._refs.values() if rc == 0) == len(self._evictable)

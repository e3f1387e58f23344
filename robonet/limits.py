"""Per-address connection limits shared by every face (HARDENING.md "per-peer connection cap").

Pure bookkeeping, no I/O: a face calls :meth:`PerAddressLimiter.acquire` when a connection from an
address is built and :meth:`~PerAddressLimiter.release` exactly once when it is lost. Only addresses
with at least one connection have an entry, so memory is bounded by the open connections.
"""

from __future__ import annotations


class PerAddressLimiter:
    """At most ``limit`` concurrent connections per address (usually the client IP string).

    ``limit`` is a positive int (ValueError otherwise). ``len(limiter)`` is the number of addresses
    that hold at least one connection.
    """

    __slots__ = ("limit", "_counts")

    def __init__(self, limit: int) -> None:
        if limit.__class__ is not int or limit < 1:
            raise ValueError(f"limit must be a positive integer, not {limit!r}")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address``; False (nothing counted) when at the limit."""
        n = self._counts.get(address, 0)
        if n >= self.limit:
            return False
        self._counts[address] = n + 1
        return True

    def release(self, address: str) -> None:
        """One connection from ``address`` ended; the entry is deleted when none is left.

        Releasing an address with no connection counted is ignored (idempotent on double release).
        """
        n = self._counts.get(address, 0) - 1
        if n > 0:
            self._counts[address] = n
        else:
            self._counts.pop(address, None)

    def count(self, address: str) -> int:
        """Connections currently counted for ``address``."""
        return self._counts.get(address, 0)

    def __len__(self) -> int:
        return len(self._counts)

"""Control leases (docs/security.rst "Control lease"): one holder drives a robot at a time.

A holder is a connection key (e.g. a dashboard's device id) with a display name (its identity).
The first holder to command a robot acquires its lease implicitly; anyone else gets
``lease_held`` (naming the holder) until it takes the lease explicitly with ``take=True``, which
notifies the former holder through the callback registered with :meth:`Leases.watch`. A stop
always passes (safety first). When a holder goes away, :meth:`Leases.release_holder` returns the
robots it held, so the caller can send each a stop. Pure: no clock, ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

Notify = Callable[[str, dict[str, Any]], object]


@attrs.define
class Lease:
    """Who controls ``device_id`` since ``since`` (Unix seconds)."""

    device_id: str
    holder: str
    holder_name: str
    since: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (``lease`` events and ``GET /api/leases``)."""
        return {
            "device_id": self.device_id,
            "holder": self.holder,
            "holder_name": self.holder_name,
            "since": self.since,
        }


class LeaseHeld(Exception):
    """The robot is controlled by someone else; ``lease`` says who."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"{lease.device_id} is controlled by {lease.holder_name}; take the lease first")
        self.lease = lease


class Leases:
    """The lease table: device_id -> :class:`Lease`, plus per-holder notification callbacks."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._watchers: dict[str, Notify] = {}

    def holder(self, device_id: str) -> Lease | None:
        """The current lease of ``device_id``, or None."""
        return self._leases.get(device_id)

    def all(self) -> list[dict[str, Any]]:
        """Every lease, by device id."""
        return [self._leases[k].as_dict() for k in sorted(self._leases)]

    def watch(self, holder: str, notify: Notify) -> None:
        """Call ``notify(event, lease_dict)`` when ``holder`` loses a lease (``lease_lost``)."""
        self._watchers[holder] = notify

    def unwatch(self, holder: str) -> None:
        """Stop notifying ``holder``."""
        self._watchers.pop(holder, None)

    def check(self, device_id: str, holder: str, holder_name: str, now: float) -> Lease:
        """Acquire or confirm ``holder``'s lease on ``device_id``; raises :class:`LeaseHeld`."""
        lease = self._leases.get(device_id)
        if lease is None:
            lease = self._leases[device_id] = Lease(device_id, holder, holder_name, now)
            return lease
        if lease.holder != holder:
            raise LeaseHeld(lease)
        return lease

    def take(self, device_id: str, holder: str, holder_name: str, now: float) -> Lease | None:
        """Take the lease of ``device_id`` explicitly; returns the previous lease (its holder has been
        notified with ``lease_lost``) or None."""
        old = self._leases.get(device_id)
        self._leases[device_id] = Lease(device_id, holder, holder_name, now)
        if old is not None and old.holder != holder:
            self._notify(old.holder, "lease_lost", self._leases[device_id].as_dict())
            return old
        return None

    def release(self, device_id: str, holder: str) -> bool:
        """Give up ``holder``'s lease on ``device_id``; False if it did not hold it."""
        lease = self._leases.get(device_id)
        if lease is None or lease.holder != holder:
            return False
        del self._leases[device_id]
        return True

    def release_holder(self, holder: str) -> list[str]:
        """Drop every lease of ``holder`` (it disconnected); returns those robots' ids."""
        self._watchers.pop(holder, None)
        gone = [k for k, v in self._leases.items() if v.holder == holder]
        for k in gone:
            del self._leases[k]
        return gone

    def _notify(self, holder: str, event: str, body: dict[str, Any]) -> None:
        fn = self._watchers.get(holder)
        if fn is not None:
            try:
                fn(event, body)
            except Exception:  # a broken watcher must not stop the take
                from twisted.logger import Logger

                Logger(namespace="robonet.lease").failure("lease notification failed")

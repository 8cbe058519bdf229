"""Status snapshots for the WatchStatus streams: one build per burst of changes, shared by every watcher.

Under churn (hundreds of clients registering, polling and uploading) the coordinator changes
hundreds of times a second; building a status after each change for each watcher put the status
builder on the event loop's hot path (issue 12). While anyone watches, one task follows the
coordinator's changes and builds snapshots for all watchers:

- a change that moves a milestone (phase, round, committed round, health) is built at once, so
  a watcher sees every phase a round goes through, however short (AGGREGATING of a tiny projector);
- other changes are throttled: the first after a quiet `interval_s` is built at once, those that
  follow within `interval_s` of a build gather into one build at the end of the interval.

A watcher sends the newest snapshot it has not sent yet (a slow one skips to the newest, never
an older state), and its stream ends after a DONE snapshot, which is always built: reaching DONE
moves the phase. A watcher that joins gets a snapshot at once: the latest when it is younger than
`interval_s`, else one built for it (and published to the others too: it is newer).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable

from fedcmp.common.wire import coordinator_pb2 as pb

WATCH_INTERVAL_S = 0.2  # at most one snapshot per this many seconds for all watchers together
DONE = "DONE"
_ENDED = object()  # what the change stream yields once it is over


async def newest_until_done(latest: Callable[[], tuple[int, pb.Status]],
                            newer: Callable[[], Awaitable[bool]]) -> AsyncIterator[pb.Status]:
    """A watcher's stream: the `latest` (version, snapshot) now, then each newer one (a slow
    watcher skips to the newest, never an older state), until a DONE one. `newer` waits for a
    version after the latest, or returns False when none will come."""
    sent = 0
    while True:
        version, snapshot = latest()
        if version > sent:
            sent = version
            yield snapshot
            if snapshot.phase == DONE:
                return
        elif not await newer():
            return


class StatusFeed:
    """Builds status snapshots for all watchers of one coordinator; `builds` counts them."""

    def __init__(self, changes: Callable[[], AsyncIterator[None]], build: Callable[[], pb.Status],
                 milestone: Callable[[], Hashable], interval_s: float = WATCH_INTERVAL_S) -> None:
        self._changes = changes  # yields now, then after every change, and ends once the run is DONE
        self._build = build
        self._milestone = milestone  # cheap: what a change must not be coalesced across
        self._built_milestone: Hashable = None
        self.interval_s = interval_s
        self.builds = 0
        self._snapshot: pb.Status | None = None
        self._version = 0  # of the latest snapshot; a watcher remembers the last one it sent
        self._built_at = float("-inf")
        self._published = asyncio.Event()
        self._watchers = 0
        self._follower: asyncio.Task[None] | None = None

    def _publish(self) -> None:
        self._built_milestone = self._milestone()
        self._snapshot = self._build()
        self.builds += 1
        self._version += 1
        self._built_at = asyncio.get_running_loop().time()
        self._published.set()
        self._published = asyncio.Event()

    async def _follow(self, changes: AsyncIterator[None]) -> None:
        loop = asyncio.get_running_loop()
        pending: asyncio.Future | None = None  # the next change, awaited across throttling timeouts
        unbuilt = False  # a change happened that no snapshot shows yet
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(changes, _ENDED))
                wait = max(self._built_at + self.interval_s - loop.time(), 0.0) if unbuilt else None
                await asyncio.wait((pending,), timeout=wait)
                if pending.done():
                    ended = pending.result() is _ENDED
                    pending = None
                    if ended:
                        if unbuilt:
                            self._publish()
                        return
                    unbuilt = True
                    if self._milestone() == self._built_milestone and loop.time() < self._built_at + self.interval_s:
                        continue  # gathered into the build at the end of the interval
                self._publish()
                unbuilt = False
        finally:
            if pending is not None:
                pending.cancel()
            self._published.set()  # watchers waiting on a follower that ended look again

    async def _next_build(self) -> bool:
        """Wait for the next snapshot; False once the follower has ended (raising its error, if any)."""
        if self._follower.done():
            self._follower.result()  # a failed build ends the stream with its error
            return False
        await self._published.wait()
        return True

    async def watch(self) -> AsyncIterator[pb.Status]:
        """Snapshots for one watcher: one now, then the newest after changes, until a DONE one."""
        self._watchers += 1
        try:
            if self._follower is None or self._follower.done():
                changes = aiter(self._changes())
                await anext(changes)  # subscribed before the build below: no change can fall between
                self._follower = asyncio.create_task(self._follow(changes))
                self._publish()
            elif asyncio.get_running_loop().time() - self._built_at > self.interval_s:
                self._publish()
            async for snapshot in newest_until_done(lambda: (self._version, self._snapshot), self._next_build):
                yield snapshot
        finally:
            self._watchers -= 1
            if self._watchers == 0 and self._follower is not None:
                self._follower.cancel()
                self._follower = None

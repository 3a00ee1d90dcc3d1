"""Heartbeats between ranks, so that a rank that dies or hangs is named and the others stop within a bounded time.

A collective with a dead peer either fails at once (gloo: "connection closed by peer", no rank named) or waits for the
process group's timeout (NCCL: 30 minutes here). Each rank therefore bumps a counter in a small TCP store every few
seconds from a daemon thread, and watches the others' counters on its own clock (no clock is compared across
hosts). A rank whose counter has not moved for ``timeout_s`` is reported by number and host, and this process exits
with code 1. The store lives on rank 0: when rank 0 itself is gone, the others lose the store and say so.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

logger = logging.getLogger(__name__)

LOST_EXIT_CODE = 1
_running: Optional["PeerWatchdog"] = None


class PeerWatchdog:
    """Starts with :meth:`start` (a collective: every rank calls it after the process group is up)."""

    def __init__(self, timeout_s: float, interval_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self.interval_s = interval_s or max(0.5, min(5.0, timeout_s / 5))
        self._store = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "PeerWatchdog":
        import torch.distributed as dist
        from torch.distributed import TCPStore

        from .distributed import free_port

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world == 1:
            return self
        where = [(os.environ.get("MASTER_ADDR", "127.0.0.1"), free_port())] if self.rank == 0 else [None]
        dist.broadcast_object_list(where, src=0)
        host, port = where[0]
        self._store = TCPStore(host, port, self.world, is_master=self.rank == 0, wait_for_workers=False,
                               timeout=timedelta(seconds=self.timeout_s))
        self._store.set(f"host/{self.rank}", f"{socket.gethostname()} pid {os.getpid()}")
        self._beat(0)
        dist.barrier()  # every rank's first beat is in the store
        self._thread = threading.Thread(target=self._run, name="miss_ds-watchdog", daemon=True)
        self._thread.start()
        global _running
        _running = self
        return self

    def _beat(self, count: int) -> None:
        self._store.set(f"beat/{self.rank}", str(count))

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        last = {r: ("", time.monotonic()) for r in peers}
        count = 0
        while True:
            time.sleep(self.interval_s)
            now = time.monotonic()
            try:
                count += 1
                self._beat(count)
                for r in peers:
                    seen = self._store.get(f"beat/{r}").decode()
                    if seen != last[r][0]:
                        last[r] = (seen, now)
            except Exception as exc:  # noqa: BLE001 - the store is on rank 0: losing it means losing rank 0
                self._stop([0], f"lost the heartbeat store on rank 0 ({type(exc).__name__}: {exc})")
                return
            stalled = [r for r in peers if now - last[r][1] > self.timeout_s]
            if stalled:
                self._stop(stalled, f"no heartbeat for more than {self.timeout_s:g} s")
                return

    def _stop(self, ranks: list[int], why: str) -> None:
        """Report the lost ranks and end this process (the main thread may be stuck in a collective)."""
        hosts = []
        for r in ranks:
            try:
                hosts.append(f"rank {r} ({self._store.get(f'host/{r}').decode()})")
            except Exception:  # noqa: BLE001 - the store may be gone with rank 0
                hosts.append(f"rank {r}")
        logger.error("rank %d: lost %s: %s; it died or hangs. Stopping (parallel.peer_timeout_s=%g)", self.rank,
                     ", ".join(hosts), why, self.timeout_s)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(LOST_EXIT_CODE)


#: How gloo reports a peer whose process is gone (a plain RuntimeError, not a torch.distributed.DistError).
GLOO_LOST_PEER = ("Connection closed by peer", "Connection reset by peer")


def name_lost_peer(exc: BaseException) -> None:
    """After a collective failed because a peer is gone: wait until the watchdog has named that rank (it then ends
    this process), at most ``timeout_s`` and two heartbeats. Other errors return at once."""
    import torch.distributed as dist

    lost_peer = isinstance(exc, dist.DistError) or any(text in str(exc) for text in GLOO_LOST_PEER)
    if _running is None or _running._thread is None or not lost_peer:
        return
    _running._thread.join(_running.timeout_s + 2 * _running.interval_s)

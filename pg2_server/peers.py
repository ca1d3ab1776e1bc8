"""The peers of a ROUTER socket: replies held within byte budgets, and peers that went away.

ZeroMQ queues replies per peer up to SNDHWM *messages*, whatever their size, so a client that
never reads could make a server hold gigabytes. `configure` gives the socket a small SNDHWM and
ROUTER_MANDATORY: a send to a peer whose queue is full then fails at once (EAGAIN) instead of
blocking or dropping silently, and a send to a peer that is gone fails with EHOSTUNREACH.
`Delivery` keeps the replies ZeroMQ did not take, counted in bytes per peer and in total, and
drops (and counts) a reply past either budget. What a peer had waiting is freed when it goes.

`PeerTracker` tells which peers went away, so their queued work can be cancelled: libzmq's
ROUTER_NOTIFY is a draft API missing from the usual builds, so it watches the socket monitor's
ACCEPTED and DISCONNECTED events (which name the connection's file descriptor) and the file
descriptor each message came from (ZMQ_SRCFD). One connection of a ROUTER has exactly one
routing id.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from .wire.protocol import MIB

log = logging.getLogger("pg2_server.peers")

# Replies ZeroMQ itself may hold per peer (beyond them Delivery counts bytes): small, because
# ZeroMQ counts messages, and a message may be a 4096² raw image.
SEND_HWM = 8


_SENT, _FULL, _GONE = "sent", "full", "gone"


def configure(sock: zmq.Socket) -> None:
    """Settings (before bind) that let Delivery see full and vanished peers."""
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)


def waiting(sock: zmq.Socket) -> Iterator[list[zmq.Frame]]:
    """Every message already queued on `sock`, without waiting for more."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        yield frames


def _size(frames: list) -> int:
    return sum(len(f) for f in frames)


def _identity(frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


@dataclass(frozen=True)
class ReplyBudget:
    """Bytes of replies held for clients that do not read them: per client, and in all."""
    per_client: int = 64 * MIB
    total: int = 512 * MIB

    def __post_init__(self) -> None:
        if self.per_client < 1 or self.total < 1:
            raise ValueError(f"reply budgets must be positive, got {self.per_client} and {self.total} bytes")


class Delivery:
    """Sends replies (envelope + message frames) on a ROUTER, holding at most `peer_bytes` per
    peer and `total_bytes` in all for peers that are not reading; used from the socket's thread."""

    def __init__(self, sock: zmq.Socket, peer_bytes: int, total_bytes: int):
        self.sock = sock
        self.peer_bytes = peer_bytes
        self.total_bytes = total_bytes
        self._held: dict[bytes, deque] = {}
        self._held_by_peer: dict[bytes, int] = {}
        self.held_bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self.unreachable = 0

    @property
    def holding(self) -> bool:
        """Replies are waiting for a peer's queue to have room (the loop should retry soon)."""
        return bool(self._held)

    def send(self, frames: list) -> None:
        """Send one reply now, or hold it (in order, behind what already waits for that peer)."""
        peer = _identity(frames[0])
        if peer in self._held:
            self._hold(peer, frames)
            return
        outcome = self._try(frames)
        if outcome == _FULL:
            self._hold(peer, frames)
        elif outcome == _GONE:
            self.unreachable += 1

    def flush(self) -> None:
        """Retry the held replies, oldest first per peer."""
        for peer in list(self._held):
            waiting = self._held[peer]
            while waiting:
                frames, size = waiting[0]
                outcome = self._try(frames)
                if outcome == _FULL:
                    break
                if outcome == _GONE:
                    self.forget(peer)  # counts this reply and the rest as unreachable
                    break
                waiting.popleft()
                self._release(peer, size)

    def forget(self, peer: bytes) -> None:
        """Free what was held for a peer that went away."""
        waiting = self._held.pop(peer, None)
        if waiting:
            freed = self._held_by_peer.pop(peer, 0)
            self.held_bytes -= freed
            self.unreachable += len(waiting)
            log.debug("peer %s gone: %d held replies (%d bytes) freed", peer.hex(), len(waiting), freed)

    def stats(self) -> dict:
        """Counters for `info`: what is held now, what was dropped over the budgets or for gone peers."""
        return {"replies_held": sum(len(q) for q in self._held.values()), "reply_bytes_held": self.held_bytes,
                "replies_dropped": self.dropped, "reply_bytes_dropped": self.dropped_bytes,
                "replies_unreachable": self.unreachable,
                "reply_budget_bytes": {"per_client": self.peer_bytes, "total": self.total_bytes}}

    def _try(self, frames: list) -> str:
        """_SENT, _FULL (the peer's queue in ZeroMQ is full) or _GONE (no such peer any more)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return _SENT
        except zmq.Again:
            return _FULL
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return _GONE

    def _hold(self, peer: bytes, frames: list) -> None:
        size = _size(frames)
        held = self._held_by_peer.get(peer, 0)
        if held + size > self.peer_bytes or self.held_bytes + size > self.total_bytes:
            if not self.dropped or self.dropped % 1000 == 0:
                log.warning("dropping a %d-byte reply to peer %s: it holds %d unread bytes (budget %d per client, "
                            "%d of %d in all)", size, peer.hex(), held, self.peer_bytes, self.held_bytes,
                            self.total_bytes)
            self.dropped += 1
            self.dropped_bytes += size
            return
        self._held.setdefault(peer, deque()).append((frames, size))
        self._held_by_peer[peer] = held + size
        self.held_bytes += size

    def _release(self, peer: bytes, size: int) -> None:
        self.held_bytes -= size
        remaining = self._held_by_peer[peer] - size
        if self._held.get(peer):
            self._held_by_peer[peer] = remaining
        else:
            self._held.pop(peer, None)
            self._held_by_peer.pop(peer, None)


class PeerTracker:
    """Which peers of a ROUTER went away: call `seen` for every message, `gone` every loop.

    The monitor reports each connection's start (accepted, or connected) and end with its file
    descriptor; a descriptor is reused by the next connection once one closes. So each
    descriptor keeps its connections in order, oldest first, each with the peer that spoke on
    it, and a closing connection is always the oldest of its descriptor: one that never spoke
    (a port probe, a client refused by CURVE) ends without naming any peer.
    """

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._connections: dict[int, deque] = {}   # fd → [peer or None] per connection, oldest first

    def _events(self) -> list[bytes]:
        """Apply the monitor's queued events; returns the peers whose connection closed."""
        gone = []
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return gone
            fd = event["value"]
            if event["event"] in (zmq.EVENT_ACCEPTED, zmq.EVENT_CONNECTED):
                self._connections.setdefault(fd, deque()).append([None])
                continue
            connections = self._connections.get(fd)
            if not connections:
                continue
            peer = connections.popleft()[0]
            if not connections:
                del self._connections[fd]
            if peer is not None:
                gone.append(peer)

    def seen(self, frames: list) -> list[bytes]:
        """Note the connection a message came on; returns the peers known gone by now (events
        are read first, so the message's own connection is known)."""
        gone = self._events()
        fd = frames[0].get(zmq.SRCFD)
        connections = self._connections.setdefault(fd, deque())
        if not connections:   # accepted before the monitor started
            connections.append([None])
        connections[-1][0] = frames[0].bytes
        return gone

    def gone(self) -> list[bytes]:
        """Peers whose connection closed since the last call."""
        return self._events()

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is closed already
        self.monitor.close(linger=0)

"""Delivery and PeerTracker on real loopback ROUTER/DEALER sockets: byte budgets for a peer
that does not read, what is freed when it goes, and which peers went away."""
import time

import pytest
import zmq

from pg2_server import peers


CONTEXT = {}


@pytest.fixture
def router():
    context = CONTEXT["context"] = zmq.Context()  # its own: nothing left behind for other tests
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    peers.configure(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()
    context.destroy(linger=0)


def connect(endpoint):
    dealer = CONTEXT["context"].socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.connect(endpoint)
    return dealer


def hello(sock, dealer):
    dealer.send(b"hello")
    assert sock.poll(5000)
    return sock.recv_multipart(copy=False)


def settle(delivery, seconds=0.3):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        delivery.flush()
        time.sleep(0.01)


def test_a_peer_that_does_not_read_is_held_within_its_budget_then_freed(router):
    sock, endpoint = router
    tracker = peers.PeerTracker(sock)
    reader = connect(endpoint)
    first = hello(sock, reader)
    tracker.seen(first)
    identity = first[0].bytes
    delivery = peers.Delivery(sock, peer_bytes=1_000_000, total_bytes=10_000_000)
    payload = b"x" * 300_000
    for _ in range(60):  # 18 MB for a peer that reads nothing
        delivery.send([identity, payload])
        settle(delivery, 0.005)
    stats = delivery.stats()
    assert 0 < stats["reply_bytes_held"] <= 1_000_000 and stats["replies_held"] == 3
    assert stats["replies_dropped"] >= 60 - 3 - peers.SEND_HWM - 20  # ZeroMQ and the kernel take a few
    assert stats["reply_bytes_dropped"] == stats["replies_dropped"] * (300_000 + len(identity))  # envelope too
    reader.close()
    # ZeroMQ keeps a full queue of a closed peer for a while (sends say "full", not "gone"):
    # the server learns of the close from the socket monitor, as here.
    deadline = time.monotonic() + 5
    while identity not in tracker.gone():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tracker.close()
    delivery.forget(identity)
    settle(delivery)
    stats = delivery.stats()
    assert stats["reply_bytes_held"] == 0 and stats["replies_held"] == 0 and delivery.held_bytes == 0
    assert stats["replies_unreachable"] == 3 and not delivery.holding


def test_held_replies_go_out_in_order_once_the_peer_reads(router):
    sock, endpoint = router
    reader = connect(endpoint)
    identity = hello(sock, reader)[0].bytes
    delivery = peers.Delivery(sock, peer_bytes=10_000_000, total_bytes=10_000_000)
    for i in range(30):
        delivery.send([identity, str(i).encode() + b" " * 100_000])
    assert delivery.holding
    received = []
    deadline = time.monotonic() + 10
    while len(received) < 30:
        assert time.monotonic() < deadline
        delivery.flush()
        if reader.poll(10):
            received.append(int(reader.recv().split(b" ")[0]))
    assert received == list(range(30)) and delivery.held_bytes == 0 and delivery.stats()["replies_dropped"] == 0
    reader.close()


def test_the_total_budget_is_shared_by_all_peers(router):
    sock, endpoint = router
    readers = [connect(endpoint) for _ in range(3)]
    identities = [hello(sock, r)[0].bytes for r in readers]
    delivery = peers.Delivery(sock, peer_bytes=10_000_000, total_bytes=1_000_000)
    for _ in range(40):
        for identity in identities:
            delivery.send([identity, b"y" * 200_000])
    assert delivery.held_bytes <= 1_000_000 and delivery.stats()["replies_dropped"] > 0
    for r in readers:
        r.close()


def test_tracker_names_the_peers_that_went_away(router):
    sock, endpoint = router
    tracker = peers.PeerTracker(sock)
    try:
        stay, leave = connect(endpoint), connect(endpoint)
        stay_id = tracker.seen(hello(sock, stay)) or hello(sock, stay)[0].bytes
        leave_frames = hello(sock, leave)
        assert tracker.seen(leave_frames) == []
        leave.close()
        deadline = time.monotonic() + 5
        gone = []
        while not gone:
            assert time.monotonic() < deadline
            gone = tracker.gone()
            time.sleep(0.02)
        assert gone == [leave_frames[0].bytes] and stay_id != gone[0]
        assert tracker.gone() == []
        stay.close()
    finally:
        tracker.close()


def test_waiting_reads_what_is_queued_and_returns_without_blocking(router):
    sock, endpoint = router
    dealer = connect(endpoint)
    for i in range(3):
        dealer.send_multipart([b"m", str(i).encode()])
    assert sock.poll(5000)
    deadline = time.monotonic() + 5
    got = []
    while len(got) < 3 and time.monotonic() < deadline:
        got += [[f.bytes for f in frames[1:]] for frames in peers.waiting(sock)]
    assert got == [[b"m", b"0"], [b"m", b"1"], [b"m", b"2"]]   # in order, without the routing id
    started = time.monotonic()
    assert list(peers.waiting(sock)) == []                       # nothing queued: returns at once
    assert time.monotonic() - started < 0.5
    dealer.close()


def test_a_connection_that_never_spoke_does_not_write_off_the_next_client(router):
    """A client leaves; a port probe connects and closes on the same file descriptor; a live
    client takes it and speaks before the tracker has read any of those events: only the one
    that left is gone. (The monitor's events are fed by hand, in the order libzmq sends them.)"""
    import struct

    sock, _ = router
    tracker = peers.PeerTracker(sock)
    feed = CONTEXT["context"].socket(zmq.PAIR)
    tracker.monitor.close(linger=0)
    tracker.monitor = CONTEXT["context"].socket(zmq.PAIR)
    tracker.monitor.bind("inproc://events")
    feed.connect("inproc://events")

    def event(kind, fd):
        feed.send_multipart([struct.pack("=hi", kind, fd), b"tcp://127.0.0.1:1"])

    class Message:   # a received frame: its routing id and the descriptor it came on
        def __init__(self, peer, fd):
            self.bytes, self.fd = peer, fd

        def get(self, option):
            assert option == zmq.SRCFD
            return self.fd

    try:
        event(zmq.EVENT_ACCEPTED, 15)
        time.sleep(0.05)
        assert tracker.seen([Message(b"A", 15)]) == []
        for kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED, zmq.EVENT_ACCEPTED):
            event(kind, 15)                  # A goes; the probe comes and goes; C comes
        time.sleep(0.05)
        assert tracker.seen([Message(b"C", 15)]) == [b"A"]
        assert tracker.gone() == []
        event(zmq.EVENT_DISCONNECTED, 15)
        time.sleep(0.05)
        assert tracker.gone() == [b"C"]
    finally:
        sock.disable_monitor()
        feed.close(linger=0)
        tracker.monitor.close(linger=0)

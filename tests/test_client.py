"""The client against stand-in servers on real loopback sockets: Lazy Pirate retries,
pipelining, late and duplicate replies, error codes, endpoint and key checks."""
import threading
import time

import msgpack
import pytest
import zmq

from pg2_server.wire import protocol
from pg2_server.wire.client import Client, GenerateRequest, ServerError, ServerTimeout, source_format
from pg2_server.wire.curve import ClientKeys
from conftest import free_port

KEYPOINTS = [[float(i), float(2 * i)] for i in range(18)]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


class StandIn(threading.Thread):
    """A ROUTER that answers with `respond(number, header, frames)` → list of replies (or [] to stay silent)."""

    def __init__(self, respond):
        super().__init__(daemon=True)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.respond = respond
        self.received = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self):
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self.ready.set()
        while not self.stop.is_set():
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            envelope, message = protocol.split_envelope(frames)
            header = msgpack.unpackb(message[0])
            self.received.append(header)
            for reply in self.respond(len(self.received), header, message):
                sock.send_multipart(envelope + reply)
        sock.close()

    def __enter__(self):
        self.start()
        self.ready.wait()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def image_reply(request_id, width=2, height=1):
    spec = {"format": "raw", "width": width, "height": height, "channels": 3, "stage": "g2"}
    return protocol.encode_reply(request_id, {"image": spec, "images": [spec], "timing": {"total_ms": 1.0},
                                              "model": "stand-in"}, [b"\x07" * (width * height * 3)])


def test_lazy_pirate_resends_after_a_lost_request():
    # The first copy of every request is "lost"; the re-sent copy is answered.
    def respond(number, header, frames):
        return [] if number % 2 == 1 else [image_reply(header["id"])]

    with StandIn(respond) as server, Client(server.endpoint, timeout=1.0, retries=3) as client:
        result = client.generate(PNG, KEYPOINTS, (2, 1))
        assert result.image.data == b"\x07" * 6 and result.model == "stand-in"
        assert [h["id"] for h in server.received] == [1, 1]


def test_a_reply_with_another_id_is_ignored():
    # Each answer is preceded by a stray reply to some earlier request; the client must skip it.
    def respond(number, header, frames):
        return [protocol.encode_reply(10_000 + number, {"pong": True, "stale": True}),
                protocol.encode_reply(header["id"], {"pong": True})]

    with StandIn(respond) as server, Client(server.endpoint, timeout=5, retries=1) as client:
        assert client.ping() > 0
        assert client.info() == {"pong": True}
        assert len(server.received) == 2


def test_no_server_times_out_after_every_attempt():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(endpoint, timeout=0.2, retries=3) as client:
        with pytest.raises(ServerTimeout) as caught:
            client.ping()
    assert 0.55 < time.monotonic() - started < 3
    assert "3 attempt(s)" in str(caught.value) and endpoint in str(caught.value)


def test_server_error_carries_code_and_message():
    def respond(number, header, frames):
        return [protocol.encode_error(header["id"], "overloaded", "the queue is full; retry later")]

    with StandIn(respond) as server, Client(server.endpoint, timeout=2) as client:
        with pytest.raises(ServerError) as caught:
            client.generate(PNG, KEYPOINTS, (2, 1))
    assert caught.value.code == "overloaded" and caught.value.message == "the queue is full; retry later"


def test_malformed_reply_is_reported_as_such():
    def respond(number, header, frames):
        return [[b"\xc1"]]

    with StandIn(respond) as server, Client(server.endpoint, timeout=2) as client:
        with pytest.raises(ServerError) as caught:
            client.ping()
    assert caught.value.code == "bad_reply"


def test_generate_many_pipelines_and_matches_replies_out_of_order():
    # Replies come back in reverse order of each group of four.
    pending = []

    def respond(number, header, frames):
        pending.append(header)
        if len(pending) < 4 and header["size"][0] < 13:
            return []
        batch, pending[:] = list(pending), []
        return [image_reply(h["id"], h["size"][0], h["size"][1]) for h in reversed(batch)]

    requests = [GenerateRequest(PNG, KEYPOINTS, (i + 1, 2), tag=i) for i in range(13)]
    with StandIn(respond) as server, Client(server.endpoint, timeout=5) as client:
        results = list(client.generate_many(requests, in_flight=4))
    assert sorted(r.request.tag for r in results) == list(range(13))
    for result in results:
        assert result.image.width == result.request.size[0]
    assert [r.request.tag for r in results][:4] == [3, 2, 1, 0]


def test_a_call_in_the_middle_of_generate_many_keeps_its_replies():
    """A ping (or a cancel) between two results reads the pipeline's replies off the socket:
    they are kept for it, not dropped and sent again after the timeout."""
    def respond(number, header, frames):
        if header["op"] == "ping":
            return [protocol.encode_reply(header["id"], {"pong": True})]
        return [image_reply(header["id"], header["size"][0], header["size"][1])]

    requests = [GenerateRequest(PNG, KEYPOINTS, (i + 1, 2), tag=i) for i in range(8)]
    with StandIn(respond) as server, Client(server.endpoint, timeout=5, retries=1) as client:
        started, results = time.monotonic(), []
        for result in client.generate_many(requests, in_flight=8):
            results.append(result)
            if len(results) == 1:
                time.sleep(0.2)              # the other seven replies are waiting on the socket
                assert client.ping() > 0
        elapsed = time.monotonic() - started
        generates = [h for h in server.received if h["op"] == "generate"]
    assert sorted(r.request.tag for r in results) == list(range(8)) and elapsed < 3
    assert len(generates) == 8                # none sent twice


def test_generate_many_resends_outstanding_requests_and_drops_duplicates():
    # Every request is answered twice, the first ones only after a delay that triggers a re-send.
    def respond(number, header, frames):
        if number <= 2:
            time.sleep(0.35)
        return [image_reply(header["id"]), image_reply(header["id"])]

    requests = [GenerateRequest(PNG, KEYPOINTS, (2, 1), tag=i) for i in range(5)]
    with StandIn(respond) as server, Client(server.endpoint, timeout=0.3, retries=6) as client:
        results = list(client.generate_many(requests, in_flight=2))
    assert sorted(r.request.tag for r in results) == [0, 1, 2, 3, 4]


def test_generate_many_errors_raise_or_are_returned():
    def respond(number, header, frames):
        if header["id"] % 2 == 0:
            return [protocol.encode_error(header["id"], "bad_request", "keypoint 3 is NaN")]
        return [image_reply(header["id"])]

    requests = [GenerateRequest(PNG, KEYPOINTS, (2, 1), tag=i) for i in range(4)]
    with StandIn(respond) as server, Client(server.endpoint, timeout=2) as client:
        results = list(client.generate_many(requests, in_flight=4, raise_errors=False))
        assert sorted((r.ok, r.request.tag) for r in results) == [(False, 1), (False, 3), (True, 0), (True, 2)]
        failed = next(r for r in results if not r.ok)
        with pytest.raises(ServerError, match="keypoint 3 is NaN"):
            failed.image
        with pytest.raises(ServerError) as caught:
            list(client.generate_many(requests, in_flight=1))
        assert caught.value.code == "bad_request"


def test_request_frames_describe_the_source():
    frames = GenerateRequest(b"\x00" * 12, KEYPOINTS, (2, 2), source_size=(2, 2), output_format="raw",
                             alpha=True, stages=("g2", "g1"), model="m").frames(41)
    request = protocol.decode_request(frames)
    assert request.id == 41 and request.source_spec.format == "raw" and request.source_spec.width == 2
    assert request.output.alpha and request.output.stages == ("g2", "g1") and request.model == "m"
    assert source_format(b"\xff\xd8\xff\xe0....") == "jpeg"
    with pytest.raises(ValueError, match="neither PNG nor JPEG"):
        source_format(b"GIF89a")


@pytest.mark.parametrize("endpoint, words", [("http://gpu:5557", "web address"), ("gpu:5557", "no transport")])
def test_client_checks_the_endpoint(endpoint, words):
    with pytest.raises(ValueError, match=words):
        Client(endpoint)


def test_client_rejects_bad_settings_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="timeout"):
        Client(timeout=0)
    with pytest.raises(ValueError, match="retries"):
        Client(retries=0)
    with pytest.raises(ValueError, match="does not exist"):
        ClientKeys.from_files(tmp_path / "server.key", tmp_path / "me.key_secret")
    import zmq.auth
    public, secret = zmq.auth.create_certificates(str(tmp_path), "me")
    with pytest.raises(ValueError, match="no secret key"):
        ClientKeys.from_files(public, public)
    curve = ClientKeys.from_files(public, secret)
    assert len(curve.server_public) == 40 and len(curve.client_secret) == 40


def test_ready_cancel_and_deadline_on_the_wire():
    def respond(number, header, frames):
        if header["op"] == "ping":
            body = {"pong": True} if number == 1 else {"pong": True, "ready": number == 2}
            return [protocol.encode_reply(header["id"], body)]
        if header["op"] == "cancel":
            return [protocol.encode_reply(header["id"], {"cancelled": 3 if "target" not in header else 1})]
        return [protocol.encode_error(header["id"], "deadline_exceeded", "too late")]

    with StandIn(respond) as server, Client(server.endpoint, timeout=5) as client:
        assert client.ready() is True   # a server from before `ready`: it answered, so take it as ready
        assert client.ready() is True
        assert client.ready() is False
        assert client.cancel("frame-7") == 1 and client.cancel() == 3
        with pytest.raises(ServerError) as caught:
            client.generate(PNG, KEYPOINTS, (4, 4), deadline_ms=20)
        assert caught.value.code == "deadline_exceeded"
    assert server.received[3] == {"v": 1, "op": "cancel", "id": server.received[3]["id"], "target": "frame-7"}
    assert "target" not in server.received[4] and server.received[5]["deadline_ms"] == 20

"""The messages between a broker and its workers (zguide's Paranoid Pirate), which both import.

A worker connects a DEALER to the broker's backend; the first frame of every message is one
of the commands below:

    worker → broker   [READY, msgpack{info, capacity}]  [HEARTBEAT, msgpack counters]
                      [REPLY, key, reply frames...]      [DISCONNECT]
    broker → worker   [REQUEST, key, request frames...]  [HEARTBEAT]  [DISCONNECT]
                      [CANCEL, key]  (the client cancelled it or went away: drop it if not started)

`key` names the client request on the broker; the request and reply frames are the client
protocol's (`pg2_server.wire.protocol`), passed through unchanged.
"""
READY = b"READY"
HEARTBEAT = b"HEARTBEAT"
REQUEST = b"REQUEST"
REPLY = b"REPLY"
DISCONNECT = b"DISCONNECT"
CANCEL = b"CANCEL"

# Defaults shared by the broker, its workers and the standalone server: a heartbeat every
# HEARTBEAT_S and a peer silent for LIVENESS heartbeats is gone; a summary log line every SUMMARY_S;
# on stop, in-flight work gets DRAIN_S to finish.
HEARTBEAT_S = 1.0
LIVENESS = 3
SUMMARY_S = 60.0
DRAIN_S = 60.0

"""Switchboard's signed webhooks in a Flask app (docs/backend.md#webhooks).

A blueprint named ``webhooks``: register it on your app

    from webhook_receiver import webhooks
    app.register_blueprint(webhooks)

and point Switchboard at it: ``WEBHOOK_URL=http://<app>/webhooks`` with
``WEBHOOK_SECRET`` set to the same value in both places (the app reads
``app.config["WEBHOOK_SECRET"]``, else the ``WEBHOOK_SECRET`` environment
variable).

Every POST is verified against the *raw* body before anything else reads
it: the signature is the hex HMAC-SHA256 of the exact bytes sent, and JSON
parsed and serialized again would not match. Events are then applied in
order: who is connected (per client id, with its user) and which topics
are occupied cluster-wide. A real app would write these to its database;
this one keeps them in memory and shows them at ``GET /webhooks/state``.

Run it alone (for a demo or a test):

    python webhook_receiver.py --port 5001
"""

import hashlib
import hmac
import json
import os
import threading

from flask import Blueprint, abort, current_app, jsonify, request

webhooks = Blueprint("webhooks", __name__)

_lock = threading.Lock()
# client id -> {"user", "transport", "node"}
CONNECTED = {}
OCCUPIED = set()
# topic -> seq of the newest occupancy event applied (events of one topic
# come from different nodes and may arrive out of order)
TOPIC_SEQ = {}
CLIENT_EVENTS = []
COUNTS = {}


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """True when ``header`` is ``sha256=<hex HMAC-SHA256 of body>``."""
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header or "")


def _secret() -> bytes:
    secret = current_app.config.get("WEBHOOK_SECRET") or os.environ.get("WEBHOOK_SECRET")
    if not secret:
        abort(500, "WEBHOOK_SECRET is not configured")
    return secret.encode()


def apply(event: dict) -> None:
    """One event, in the order the sending node produced it."""
    kind = event.get("type")
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    if kind == "client_connected":
        CONNECTED[event["client"]] = {
            "user": event["user"],
            "transport": event["transport"],
            "node": event["node"],
        }
    elif kind == "client_disconnected":
        # Keyed by client id: after a mass reconnect the new connection of
        # the same user has another id, so a late disconnect never removes it.
        CONNECTED.pop(event["client"], None)
    elif kind in ("topic_occupied", "topic_vacated"):
        topic, seq = event["topic"], event["seq"]
        if seq <= TOPIC_SEQ.get(topic, 0):
            return  # an older transition, overtaken by one already applied
        TOPIC_SEQ[topic] = seq
        if kind == "topic_occupied":
            OCCUPIED.add(topic)
        else:
            OCCUPIED.discard(topic)
    elif kind == "client_event":
        CLIENT_EVENTS.append(event)
    # Unknown types (newer versions add some) are ignored.


@webhooks.post("/webhooks")
def receive():
    body = request.get_data(cache=False)  # the raw bytes, before any parsing
    if not verify(_secret(), body, request.headers.get("X-Switchboard-Signature", "")):
        abort(401)
    batch = json.loads(body)
    with _lock:
        for event in batch["events"]:
            apply(event)
    # Any 2xx acknowledges the batch; anything else (or no answer within
    # WEBHOOK_TIMEOUT_MS) makes Switchboard send it again, identical.
    return "", 204


@webhooks.get("/webhooks/state")
def state():
    """What the events said so far (a demo view; protect or drop it in production)."""
    with _lock:
        return jsonify(
            connected=CONNECTED,
            occupied=sorted(OCCUPIED),
            clientEvents=CLIENT_EVENTS,
            counts=COUNTS,
        )


if __name__ == "__main__":
    import argparse

    from flask import Flask

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args()
    app = Flask(__name__)
    app.register_blueprint(webhooks)
    app.run(host=args.host, port=args.port, threaded=True)

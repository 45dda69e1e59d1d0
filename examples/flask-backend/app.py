"""An application back end for Switchboard, written with Flask.

Switchboard asks it, over HTTP, who may connect, subscribe, publish and what
an RPC answers (docs/backend.md). This is the seed-004 pattern: the client
sends `your_action` and receives `action_result` data, but the WebSocket is
Switchboard's, and this app only answers plain HTTP requests.

Run it (Python 3.10+, `pip install -r requirements.txt`):

    python app.py --port 5000

and start Switchboard with:

    PROXY_CONNECT_URL=http://127.0.0.1:5000/switchboard/connect
    PROXY_HEADERS=Cookie
    PROXY_SUBSCRIBE_URL=http://127.0.0.1:5000/switchboard/subscribe
    PROXY_SUBSCRIBE_TOPICS=room.*
    PROXY_PUBLISH_URL=http://127.0.0.1:5000/switchboard/publish
    PROXY_PUBLISH_TOPICS=chat.*
    PROXY_RPC_URL=http://127.0.0.1:5000/switchboard/rpc

With `PROXY_SECRET` set in both (the same value), every hook call must carry
a valid `X-Switchboard-Signature` over its `X-Switchboard-Timestamp` and
body, made within the last 5 minutes; others get 401.

Sign in with `GET /login?user=alice` (a demo login: any user of the `users`
table, no password) and connect to Switchboard with the cookie it set.
"""

import argparse
import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from http.cookies import SimpleCookie

from flask import Flask, jsonify, request, session

app = Flask(__name__)
# Sign the session cookie with a real secret in production.
app.secret_key = os.environ.get("SECRET_KEY", "dev-only-secret-change-me")
# Switchboard's PROXY_SECRET: hook calls are signed with it (docs/backend.md).
HOOK_SECRET = os.environ.get("PROXY_SECRET")

# === the application's tables (SQLite in memory, shared by the threads) ===

DB_URI = f"file:switchboard-example-{os.getpid()}?mode=memory&cache=shared"
_keeper = sqlite3.connect(DB_URI, uri=True, check_same_thread=False)
_local = threading.local()

SCHEMA = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    display TEXT NOT NULL,
    topics TEXT,            -- JSON list of topic patterns; NULL = any topic
    publish TEXT,           -- JSON list of topic patterns; NULL = none
    banned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE rooms (room TEXT PRIMARY KEY, invite TEXT);
CREATE TABLE room_members (room TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (room, user));

INSERT INTO users VALUES ('alice', 'Alice', NULL, '["chat.*"]', 0);
INSERT INTO users VALUES ('bob', 'Bob', '["news", "chat.*", "room.*"]', NULL, 0);
INSERT INTO users VALUES ('carol', 'Carol', NULL, NULL, 0);
INSERT INTO users VALUES ('mallory', 'Mallory', NULL, NULL, 1);
INSERT INTO rooms VALUES ('room.1', NULL);
INSERT INTO rooms VALUES ('room.2', 'sesame');
INSERT INTO room_members VALUES ('room.1', 'alice');
INSERT INTO room_members VALUES ('room.1', 'bob');
INSERT INTO room_members VALUES ('room.1', 'carol');
INSERT INTO room_members VALUES ('room.2', 'carol');
"""
_keeper.executescript(SCHEMA)


def db():
    """This thread's connection to the shared in-memory database."""
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(DB_URI, uri=True)
    return conn


# === the application's own pages ===


@app.get("/healthz")
def healthz():
    return "ok"


@app.get("/login")
def login():
    """Demo sign-in: sets the session cookie for `?user=`."""
    name = request.args.get("user", "")
    if db().execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
        return jsonify({"ok": False, "error": f"no such user {name!r}"}), 404
    session["user"] = name
    return jsonify({"ok": True, "user": name})


@app.get("/logout")
def logout():
    session.clear()
    return jsonify({"ok": True})


# === Switchboard hooks (docs/backend.md) ===


def session_user(cookie_header):
    """The user of a Flask session cookie found in a forwarded Cookie header."""
    cookie = SimpleCookie()
    try:
        cookie.load(cookie_header or "")
    except Exception:  # noqa: BLE001 - a malformed header is "not signed in"
        return None
    morsel = cookie.get(app.config["SESSION_COOKIE_NAME"])
    if morsel is None:
        return None
    serializer = app.session_interface.get_signing_serializer(app)
    try:
        data = serializer.loads(
            morsel.value, max_age=int(app.permanent_session_lifetime.total_seconds())
        )
    except Exception:  # noqa: BLE001 - bad signature, expired
        return None
    return data.get("user")


@app.before_request
def verify_hook_signature():
    """Hook calls come from Switchboard only, and recently: the HMAC-SHA256
    of `<X-Switchboard-Timestamp>.<raw body>` with PROXY_SECRET, compared
    in constant time, and a timestamp within 5 minutes of now."""
    if HOOK_SECRET is None or not request.path.startswith("/switchboard/"):
        return None
    timestamp = request.headers.get("X-Switchboard-Timestamp", "")
    signed = timestamp.encode() + b"." + request.get_data()
    expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), signed, hashlib.sha256).hexdigest()
    got = request.headers.get("X-Switchboard-Signature", "").encode()
    if not hmac.compare_digest(expected.encode(), got):
        return jsonify({"error": "bad or missing X-Switchboard-Signature"}), 401
    if not timestamp.isdigit() or abs(time.time() * 1000 - int(timestamp)) > 300_000:
        return jsonify({"error": "X-Switchboard-Timestamp is not within 5 minutes of now"}), 401
    return None


@app.post("/switchboard/connect")
def connect_hook():
    """A connection without a token: who is it (cookie session -> user)?"""
    body = request.get_json(force=True)
    name = session_user(body.get("headers", {}).get("Cookie"))
    if name is None:
        return jsonify({"error": {"code": 401, "message": "not signed in: sign in at /login first"}})
    row = db().execute(
        "SELECT display, topics, publish, banned FROM users WHERE name = ?", (name,)
    ).fetchone()
    if row is None:
        return jsonify({"error": {"code": 401, "message": f"unknown user {name}"}})
    display, topics, publish, banned = row
    if banned:
        # 4500-4999: the client should not reconnect.
        return jsonify({"disconnect": {"code": 4503, "reason": f"{name} is banned"}})
    result = {
        "user": name,
        # Travels with the connection: every later hook call carries it.
        "info": {"name": display, "connectData": body.get("data")},
        # Unix ms; past it the connection is closed (3000) unless refreshed.
        "expiresAt": None,
    }
    if topics is not None:
        result["topics"] = json.loads(topics)
    if publish is not None:
        result["publish"] = json.loads(publish)
    return jsonify({"result": result})


@app.post("/switchboard/subscribe")
def subscribe_hook():
    """May this user subscribe to a room? Members may; so may whoever brings
    the room's invite code as subscribe data."""
    body = request.get_json(force=True)
    user, topic, data = body["user"], body["topic"], body.get("data") or {}
    room = db().execute("SELECT invite FROM rooms WHERE room = ?", (topic,)).fetchone()
    if room is None:
        return jsonify({"error": {"code": 404, "message": f"there is no room {topic}"}})
    member = db().execute(
        "SELECT 1 FROM room_members WHERE room = ? AND user = ?", (topic, user)
    ).fetchone()
    invited = room[0] is not None and isinstance(data, dict) and data.get("invite") == room[0]
    if member is None and not invited:
        return jsonify({"error": {"code": 403, "message": f"{user or 'anonymous'} is not a member of {topic}"}})
    return jsonify({"result": {}})


@app.post("/switchboard/publish")
def publish_hook():
    """A chat message from a client: refuse spam, publish a cleaned copy
    that says who sent it."""
    body = request.get_json(force=True)
    data = body.get("data")
    text = str(data.get("text", "")) if isinstance(data, dict) else str(data)
    if "spam" in text.lower():
        return jsonify({"error": {"code": 403, "message": "no spam, please"}})
    return jsonify({"result": {"data": {"from": body["user"], "text": text[:500]}}})


def process_action(body):
    """The application's work for `your_action` (seed 004's handle_your_action)."""
    return {
        "echo": body.get("data"),
        "user": body["user"],
        "client": body["client"],
        "processedAt": int(time.time() * 1000),
    }


@app.post("/switchboard/rpc")
def rpc_hook():
    """RPCs: native `{"type":"rpc","method":…}`, or any Socket.IO event with an ack."""
    body = request.get_json(force=True)
    method = body["method"]
    if method == "your_action":
        return jsonify({"result": {"data": {"type": "action_result", "data": process_action(body)}}})
    if method == "whoami":
        return jsonify(
            {
                "result": {
                    "data": {
                        "user": body["user"],
                        "client": body["client"],
                        "transport": body["transport"],
                        "info": body.get("info"),
                    }
                }
            }
        )
    return jsonify({"error": {"code": 404, "message": f"unknown method {method}"}})


# The signed webhook receiver (webhook_receiver.py), when present.
try:
    from webhook_receiver import webhooks

    app.register_blueprint(webhooks)
except ImportError:
    pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)

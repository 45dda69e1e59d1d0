"""python-socketio: token refresh and expiry.

usage: python sio_refresh.py <url> <short_token> <long_token> <narrow_token>

short_token expires in about 7 s and allows topics a and b; long_token
allows a and b for longer; narrow_token allows only a.
- a socket that sends `refresh` with long_token before expiry stays
  connected past the short token's exp;
- a refresh with narrow_token unsubscribes b (an `unsubscribed` event with
  a reason), and keeps c, which the back end subscribed the socket to
  (`POST /api/subscribe`) although no token names it;
- an invalid refresh is refused in the ack;
- a socket that does not refresh gets an `error` event with code
  token_expired, then is disconnected by the server.
"""
import asyncio
import sys

import httpx
import socketio


async def main(url: str, short: str, long: str, narrow: str) -> None:
    kept = socketio.AsyncClient(reconnection=False)
    unsubscribed = []
    kept.on("unsubscribed", lambda d: unsubscribed.append(d))
    await kept.connect(url, auth={"token": short}, transports=["websocket"], wait_timeout=5)
    for t in ("a", "b"):
        ack = await kept.call("subscribe", t, timeout=5)
        assert ack["ok"], ack
    subscribed = asyncio.Event()
    kept.on("subscribed", lambda d: subscribed.set() if d.get("topic") == "c" else None)
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{url}/api/subscribe", json={"client": kept.get_sid(), "topic": "c"})
        assert r.json()["data"]["reached"] == 1, r.text
    await asyncio.wait_for(subscribed.wait(), 5)
    bad = await kept.call("refresh", "garbage", timeout=5)
    assert bad["ok"] is False and "refresh refused" in bad["error"], bad
    ack = await kept.call("refresh", {"token": long}, timeout=5)
    assert ack["ok"] and isinstance(ack["expiresAt"], int), ack
    print("[python] refreshed:", ack, flush=True)

    expired = socketio.AsyncClient(reconnection=False)
    errors = []
    gone = asyncio.Event()
    expired.on("error", lambda d: errors.append(d))

    @expired.on("disconnect")
    async def on_disconnect(reason=None):
        gone.set()

    await expired.connect(url, auth={"token": short}, transports=["websocket"], wait_timeout=5)
    await asyncio.wait_for(gone.wait(), 12)
    assert any(e.get("code") == "token_expired" for e in errors), errors
    print("[python] expired socket got", errors, flush=True)

    assert kept.connected, "the refreshed socket was disconnected"
    ack = await kept.call("refresh", narrow, timeout=5)
    assert ack["ok"], ack
    await asyncio.sleep(0.3)
    assert [u["topic"] for u in unsubscribed] == ["b"], unsubscribed
    assert unsubscribed[0]["reason"] == "permission revoked", unsubscribed
    await kept.disconnect()
    print("[python] OK", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 30))
    except Exception as e:  # noqa: BLE001
        print(f"[python] FAIL: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)

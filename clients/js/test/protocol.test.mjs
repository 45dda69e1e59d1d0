// The client against a scripted server that speaks the documented protocol
// (docs/protocol.md, including the history contract): duplicates, gaps,
// epoch changes, `since` on resubscribe, liveness, close-code policy. These
// run without a switchboard binary; client.test.mjs runs against real nodes.

import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";

import { Switchboard, backoff, VERSION } from "../switchboard.js";
import { ROOT, requireTool, nextEvent, eventually } from "./harness.mjs";

const WebSocket = requireTool("ws");
const { WebSocketServer } = WebSocket;

/** A server whose every connection is handed to `onConnection(socket, frames)`. */
async function fakeServer(onConnection) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.once("listening", r));
  const connections = [];
  wss.on("connection", (socket, req) => {
    const conn = { socket, url: req.url, frames: [], waiters: [] };
    connections.push(conn);
    socket.on("message", (raw) => {
      const m = JSON.parse(String(raw));
      conn.frames.push(m);
      for (const w of conn.waiters.splice(0)) w();
    });
    conn.send = (m) => socket.send(JSON.stringify({ timestamp: new Date().toISOString(), ...m }));
    conn.next = async (type) => {
      for (;;) {
        const i = conn.frames.findIndex((f) => f.type === type);
        if (i >= 0) return conn.frames.splice(i, 1)[0];
        await new Promise((r) => conn.waiters.push(r));
      }
    };
    onConnection(conn);
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    connections,
    close: () => new Promise((r) => wss.close(r)),
    terminateAll: () => wss.clients.forEach((c) => c.terminate()),
  };
}

const hello = (conn) => conn.send({ type: "connected", clientId: `c${Math.random()}`.slice(0, 10) });

test("versions: package.json, VERSION and Cargo.toml agree", () => {
  const cargo = readFileSync(path.join(ROOT, "Cargo.toml"), "utf8");
  const serverVersion = /^version\s*=\s*"([^"]+)"/m.exec(cargo)[1];
  const pkg = JSON.parse(readFileSync(path.join(ROOT, "clients/js/package.json"), "utf8"));
  assert.equal(pkg.name, "@switchboard/client");
  assert.equal(pkg.version, serverVersion);
  assert.equal(VERSION, serverVersion);
});

test("backoff: full jitter within [min, min(max, min·2^(n+1))]", () => {
  for (let n = 0; n < 12; n++) {
    const cap = Math.min(30000, 500 * 2 ** (n + 1));
    assert.equal(backoff(n, 500, 30000, () => 0), 500);
    assert.equal(backoff(n, 500, 30000, () => 1), cap);
    for (let i = 0; i < 50; i++) {
      const d = backoff(n, 500, 30000);
      assert.ok(d >= 500 && d <= cap, `attempt ${n}: ${d}`);
    }
  }
});

test("history contract: duplicates dropped, gaps reported, epoch change is unrecoverable, since on resubscribe", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    const sub = await conn.next("subscribe");
    if (!sub.since) {
      conn.send({ type: "subscribed", event: "news", offset: 10, epoch: "e1" });
      for (const [offset, n] of [[11, 1], [12, 2], [12, 2], [11, 1], [13, 3]]) {
        conn.send({ type: "event", name: "news", data: { n }, offset });
      }
      conn.send({ type: "gap", event: "news", from: 14, to: 16, epoch: "e1" });
      conn.send({ type: "event", name: "news", data: { n: 17 }, offset: 17 });
      conn.send({ type: "event", name: "headline", topic: "news", data: { n: 18 }, offset: 18 });
      await conn.next("ping").catch(() => {});
    } else if (sub.since.epoch === "e1") {
      // Second connection: recover 19..20, then live 21.
      conn.send({ type: "subscribed", event: "news", offset: 20, epoch: "e1", recovered: true });
      conn.send({ type: "event", name: "news", data: { n: 19 }, offset: 19 });
      conn.send({ type: "event", name: "news", data: { n: 20 }, offset: 20 });
      conn.send({ type: "event", name: "news", data: { n: 20 }, offset: 20 });
      conn.send({ type: "event", name: "news", data: { n: 21 }, offset: 21 });
      conn.send({ type: "gap", event: "news", from: 3, to: 4, epoch: "e2", previousEpoch: "e1" });
      conn.send({ type: "event", name: "news", data: { n: 5 }, offset: 5 });
    }
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 20, maxDelay: 50 });
  try {
    const seen = [];
    const marks = [];
    const sub = client.subscribe("news", (data, meta) => seen.push([data.n, meta.offset, meta.name]));
    sub.on("gap", (g) => marks.push(["gap", g.from, g.to, g.epoch]));
    sub.on("recovered", (r) => marks.push(["recovered", r.from, r.to]));
    sub.on("unrecoverable", (u) => marks.push(["unrecoverable", u.previousEpoch, u.epoch, u.offset]));
    await client.connect();
    await sub.ready;
    await eventually(() => seen.length === 5, 3000, "first five events");
    assert.deepEqual(seen, [
      [1, 11, "news"],
      [2, 12, "news"],
      [3, 13, "news"],
      [17, 17, "news"],
      [18, 18, "headline"],
    ]);
    assert.deepEqual(marks, [["gap", 14, 16, "e1"]]);
    assert.equal(sub.offset, 18);
    assert.equal(sub.epoch, "e1");

    // The server restarts: the client resubscribes with since.
    server.connections[0].socket.close(1012, "service restart");
    await eventually(() => seen.length === 9, 5000, "recovered events");
    const resub = server.connections[1].url;
    assert.match(resub, /^\/ws/);
    assert.deepEqual(seen.slice(5), [
      [19, 19, "news"],
      [20, 20, "news"],
      [21, 21, "news"],
      [5, 5, "news"],
    ]);
    assert.deepEqual(marks.slice(1), [
      ["recovered", 19, 20],
      ["unrecoverable", "e1", "e2", 4],
    ]);
    assert.equal(sub.epoch, "e2");
    assert.equal(sub.offset, 5);
  } finally {
    client.close();
    await server.close();
  }
});

test("history contract: the subscribe frame carries since; recovered:false is unrecoverable", async () => {
  let subscribes = [];
  const server = await fakeServer(async (conn) => {
    hello(conn);
    const sub = await conn.next("subscribe");
    subscribes.push(sub);
    if (!sub.since) {
      conn.send({ type: "subscribed", event: "t", offset: 0, epoch: "A" });
      conn.send({ type: "event", name: "t", data: 1, offset: 1 });
    } else {
      conn.send({ type: "subscribed", event: "t", offset: 900, epoch: "A", recovered: false });
      conn.send({ type: "event", name: "t", data: 901, offset: 901 });
    }
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  try {
    const got = [];
    const sub = client.subscribe("t", (d) => got.push(d));
    await client.connect();
    await eventually(() => got.length === 1);
    const lost = nextEvent(sub, "unrecoverable");
    server.terminateAll(); // 1006
    const u = await lost;
    assert.deepEqual(subscribes[1], { type: "subscribe", event: "t", since: { offset: 1, epoch: "A" } });
    assert.equal(u.offset, 900);
    await eventually(() => got.length === 2);
    assert.deepEqual(got, [1, 901]);
  } finally {
    client.close();
    await server.close();
  }
});

test("a topic without history: resubscribe after reconnect is reported unrecoverable", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    await conn.next("subscribe");
    conn.send({ type: "subscribed", event: "plain" });
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  try {
    const sub = client.subscribe("plain");
    const states = [];
    sub.on("subscribed", (s) => states.push(s.resubscribed));
    await client.connect();
    await sub.ready;
    const lost = nextEvent(sub, "unrecoverable");
    server.connections[0].socket.close(1011, "heartbeat timeout");
    const u = await lost;
    assert.match(u.reason, /no history/);
    assert.deepEqual(states, [false, true]);
    assert.deepEqual(server.connections[1].frames.length, 0, "subscribe consumed, nothing else sent");
  } finally {
    client.close();
    await server.close();
  }
});

test("liveness: a connection that stops answering pings is dropped and reconnected", async () => {
  const server = await fakeServer((conn) => {
    hello(conn); // and never answer anything
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20, pingInterval: 100, pingTimeout: 150 });
  try {
    await client.connect();
    const d = await nextEvent(client, "disconnected", 3000);
    assert.equal(d.code, 4000);
    assert.match(d.reason, /no answer to ping/);
    assert.equal(d.willReconnect, true);
    await nextEvent(client, "connected", 3000);
    assert.equal(server.connections.length, 2);
  } finally {
    client.close();
    await server.close();
  }
});

test("ping: a late pong settles only its own ping (by id); a pong without id is taken in turn", async () => {
  const server = await fakeServer((conn) => hello(conn));
  const client = new Switchboard(server.url, { WebSocket, pingInterval: 60_000, requestTimeout: 300 });
  try {
    await client.connect();
    const conn = server.connections[0];
    // A: not answered in time.
    const a = client.ping();
    const pingA = await conn.next("ping");
    assert.equal(typeof pingA.id, "number");
    await assert.rejects(a, (e) => e.code === "timeout");
    // B goes out; then A's pong arrives late. It must not settle B.
    const b = client.ping();
    const pingB = await conn.next("ping");
    assert.notEqual(pingB.id, pingA.id);
    conn.send({ type: "pong", id: pingA.id });
    await assert.rejects(b, (e) => e.code === "timeout", "B settled by A's late pong");
    // C answered by its id: resolves.
    const c = client.ping();
    const pingC = await conn.next("ping");
    conn.send({ type: "pong", id: pingC.id });
    assert.equal(typeof (await c), "number");
    // A server that does not echo ids is answered in turn.
    const d = client.ping();
    await conn.next("ping");
    conn.send({ type: "pong" });
    assert.equal(typeof (await d), "number");
  } finally {
    client.close();
    await server.close();
  }
});

test("close() while the handshake is under way ends quietly (Node ws reports it as an error event)", async () => {
  const net = await import("node:net");
  const sockets = [];
  // Accepts and never answers the upgrade: the client stays in its handshake.
  const server = net.createServer((s) => sockets.push(s));
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const client = new Switchboard(`ws://127.0.0.1:${server.address().port}/ws`, { WebSocket });
  const connecting = client.connect().catch((e) => e);
  await eventually(() => sockets.length === 1, 3000, "handshake started");
  client.close();
  assert.equal(client.state, "closed");
  assert.match(String(await connecting), /client closed/);
  // An unhandled `error` event would fail the test here, a tick later.
  await new Promise((r) => setTimeout(r, 100));
  for (const s of sockets) s.destroy();
  await new Promise((r) => server.close(r));
});

test("close codes: 1008 and 3000 stop; 1013 reconnects; close() is final", async () => {
  const codes = [1013, 1008];
  const server = await fakeServer((conn) => {
    hello(conn);
    const code = codes.shift();
    if (code) setTimeout(() => conn.socket.close(code, "scripted"), 30);
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  try {
    const events = [];
    client.on("disconnected", (d) => events.push([d.code, d.willReconnect]));
    await client.connect();
    await eventually(() => client.state === "closed", 3000, "stop on 1008");
    assert.deepEqual(events, [
      [1013, true],
      [1008, false],
    ]);
    assert.equal(server.connections.length, 2);
  } finally {
    client.close();
    await server.close();
  }

  // 3000 "token expired": stop, unless getToken has a new token.
  let n = 0;
  const server2 = await fakeServer((conn) => {
    hello(conn);
    if (n++ === 0) setTimeout(() => conn.socket.close(3000, "token expired"), 30);
  });
  const tokens = ["t1", "t2"];
  const client2 = new Switchboard(server2.url, { WebSocket, minDelay: 10, maxDelay: 20, getToken: () => tokens.shift() ?? "t2" });
  try {
    await client2.connect();
    await eventually(() => server2.connections.length === 2, 3000, "reconnect with a new token");
    assert.match(server2.connections[0].url, /token=t1/);
    assert.match(server2.connections[1].url, /token=t2/);
    client2.close();
    assert.equal(client2.state, "closed");
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(server2.connections.length, 2, "no reconnect after close()");
  } finally {
    client2.close();
    await server2.close();
  }
});

test("request, refresh and server-side unsubscribe", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    for (;;) {
      await new Promise((r) => conn.waiters.push(r));
      for (const f of conn.frames.splice(0)) {
        if (f.type === "request" && f.event === "a") conn.send({ type: "response", event: "a", data: { v: 1 }, offset: 7 });
        if (f.type === "request" && f.event === "b") conn.send({ type: "error", error: "no data for \"b\"", code: "no_data", event: "b" });
        if (f.type === "refresh") conn.send({ type: "refreshed", expiresAt: 1234 });
        if (f.type === "subscribe") {
          conn.send({ type: "subscribed", event: f.event });
          conn.send({ type: "unsubscribed", event: f.event, reason: "the new token does not allow this topic" });
        }
      }
    }
  });
  const client = new Switchboard(server.url, { WebSocket });
  try {
    await client.connect();
    const r = await client.request("a");
    assert.deepEqual(r.data, { v: 1 });
    assert.equal(r.offset, 7);
    await assert.rejects(client.request("b"), (e) => e.code === "no_data");
    assert.deepEqual(await client.refresh("new"), { expiresAt: 1234, applied: "now" });
    assert.equal(client.token, "new");
    const sub = client.subscribe("secret");
    const gone = await nextEvent(sub, "unsubscribed");
    assert.match(gone.reason, /does not allow/);
    assert.equal(sub.state, "unsubscribed");
  } finally {
    client.close();
    await server.close();
  }
});

test("errors are routed by replyTo, whatever the topic is called; gap keeps previousEpoch", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    for (;;) {
      await new Promise((r) => conn.waiters.push(r));
      for (const f of conn.frames.splice(0)) {
        // Sentences that name other message types than the one answered.
        if (f.type === "publish") {
          conn.send({ type: "error", error: `not allowed to publish to "${f.event}"`, code: "forbidden", event: f.event, replyTo: "publish" });
        }
        if (f.type === "subscribe" && f.event === "publish") {
          conn.send({ type: "error", error: 'not allowed to subscribe to "publish"', code: "forbidden", event: "publish", replyTo: "subscribe" });
        }
        if (f.type === "subscribe" && f.event === "news") {
          conn.send({ type: "subscribed", event: "news", offset: 0, epoch: "e2" });
          conn.send({ type: "gap", event: "news", from: 1, to: 2, epoch: "e2", previousEpoch: "e1" });
        }
        if (f.type === "request") {
          conn.send({ type: "error", error: `could not read "${f.event}": the subscribe path is down`, code: "unavailable", event: f.event, replyTo: "request" });
        }
      }
    }
  });
  const client = new Switchboard(server.url, { WebSocket });
  try {
    await client.connect();
    const errors = [];
    client.on("error", (e) => errors.push([e.code, e.frame.replyTo, e.topic]));
    // A pending request on "subscribe" and a refused publish on it: the
    // publish error is not taken for the request, nor the request's for a subscribe.
    const pending = client.request("subscribe");
    client.publish("subscribe", 1);
    await assert.rejects(pending, (e) => e.code === "unavailable" && e.frame.replyTo === "request");
    await eventually(() => errors.length === 1, 2000, "the publish error");
    assert.deepEqual(errors, [["forbidden", "publish", "subscribe"]]);
    const refused = client.subscribe("publish");
    await assert.rejects(refused.ready, (e) => e.code === "forbidden");
    assert.equal(refused.state, "unsubscribed");

    const news = client.subscribe("news");
    const gap = await nextEvent(news, "gap");
    assert.deepEqual(gap, { from: 1, to: 2, epoch: "e2", previousEpoch: "e1" });
    // A second subscribe() of a confirmed topic: resubscribed is false, not absent.
    const again = client.subscribe("news");
    const info = await nextEvent(again, "subscribed");
    assert.equal(info.resubscribed, false);
  } finally {
    client.close();
    await server.close();
  }

  // Not connected: refresh only keeps the token.
  const idle = new Switchboard("ws://127.0.0.1:1/ws", { WebSocket });
  assert.deepEqual(await idle.refresh("later"), { expiresAt: undefined, applied: "on next connect" });
  assert.equal(idle.token, "later");
});

test("presence: a reset becomes the joins and leaves it stands for; after a reconnect the list is read, and diffs that arrive meanwhile wait for it", async () => {
  const e = (user) => ({ user, info: null });
  let onPresence = null;
  const server = await fakeServer(async (conn) => {
    hello(conn);
    const sub = await conn.next("subscribe");
    assert.equal(sub.presence, true);
    conn.send({ type: "subscribed", event: sub.event });
    if (server.connections.length === 1) {
      conn.send({ type: "presence_diff", event: "room.1", joins: { a: e("ua"), b: e("ub") }, leaves: {} });
      return;
    }
    const read = await conn.next("presence");
    onPresence?.(conn, read);
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  const present = new Map();
  const diffs = [];
  try {
    await client.connect();
    const sub = client.subscribe("room.1", () => {}, {
      presence: { join: (id, entry) => present.set(id, entry), leave: (id) => present.delete(id) },
    });
    sub.on("presence_diff", (d) => diffs.push(d));
    await eventually(() => present.size === 2, 3000, "the first diff");
    const first = server.connections[0];
    // The server's node missed changes: a leaves, c came.
    first.send({ type: "presence_diff", event: "room.1", joins: { b: e("ub"), c: e("uc") }, leaves: {}, reset: true });
    await eventually(() => present.has("c"), 3000, "the reset");
    assert.deepEqual([...present.keys()].sort(), ["b", "c"]);
    assert.deepEqual(diffs.at(-1), { joins: { c: e("uc") }, leaves: { a: e("ua") } });
    // A reset that changes nothing is not handed on.
    first.send({ type: "presence_diff", event: "room.1", joins: { b: e("ub"), c: e("uc") }, leaves: {}, reset: true });
    // Cut off. Back, the client reads the list; a join newer than the read
    // arrives before its answer and must survive it.
    onPresence = (conn, read) => {
      assert.equal(read.event, "room.1");
      conn.send({ type: "presence_diff", event: "room.1", joins: { d: e("ud") }, leaves: {} });
      conn.send({ type: "presence", event: "room.1", clients: { c: e("uc"), x: e("ux") } });
    };
    const count = diffs.length;
    server.terminateAll();
    await eventually(() => present.has("d") && present.has("x"), 3000, "the list after the reconnect and the held diff");
    assert.deepEqual([...present.keys()].sort(), ["c", "d", "x"]);
    assert.equal(diffs.length, count + 2, JSON.stringify(diffs.slice(count)));
    assert.deepEqual(diffs[count], { joins: { x: e("ux") }, leaves: { b: e("ub") } });
    assert.deepEqual(diffs[count + 1], { joins: { d: e("ud") }, leaves: {} });
  } finally {
    client.close();
    await server.close();
  }
});

test("a second subscribed for a topic the connection holds keeps the position; no false unrecoverable after a reconnect; unsubscribe before subscribed rejects ready", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    const sub = await conn.next("subscribe");
    if (!sub.since) {
      conn.send({ type: "subscribed", event: "news", offset: 5, epoch: "e1" });
      conn.send({ type: "event", name: "news", data: { n: 6 }, offset: 6 });
      // The presence upgrade: no `since`, and an answer whose offset runs
      // ahead of an event still on its way.
      const upgrade = await conn.next("subscribe");
      assert.equal(upgrade.presence, true);
      assert.equal(upgrade.since, undefined);
      conn.send({ type: "subscribed", event: "news", offset: 8, epoch: "e1" });
      conn.send({ type: "event", name: "news", data: { n: 7 }, offset: 7 });
      conn.send({ type: "event", name: "news", data: { n: 8 }, offset: 8 });
    } else {
      conn.send({ type: "subscribed", event: "news", offset: 8, epoch: "e1", recovered: true });
      // The back end subscribes the connection to it again.
      conn.send({ type: "subscribed", event: "news", offset: 8, epoch: "e1" });
      conn.send({ type: "event", name: "news", data: { n: 9 }, offset: 9 });
    }
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  try {
    const seen = [];
    const marks = [];
    client.on("unrecoverable", (u) => marks.push(["unrecoverable", u.topic]));
    client.on("duplicate", (d) => marks.push(["duplicate", d.offset]));
    await client.connect();
    const sub = client.subscribe("news", (data) => seen.push(data.n));
    await sub.ready;
    await eventually(() => seen.length === 1, 3000, "the first event");
    const watching = client.subscribe("news", () => {}, { presence: true });
    await watching.ready;
    await eventually(() => seen.length === 3, 3000, `events 7 and 8 (${JSON.stringify(seen)})`);
    server.terminateAll();
    await eventually(() => seen.length === 4, 3000, "the event after the reconnect");
    assert.deepEqual(seen, [6, 7, 8, 9]);
    assert.deepEqual(marks, []);
    assert.equal(sub.offset, 9);
    // A subscription dropped before its answer: its ready settles.
    const early = client.subscribe("other");
    early.unsubscribe();
    await assert.rejects(early.ready, (e) => e.code === "unsubscribed");
  } finally {
    client.close();
    await server.close();
  }
});

test("a resubscription refused for now is asked again with its position; once() can be undone with off(); sseUrl keeps its path", async () => {
  const server = await fakeServer(async (conn) => {
    hello(conn);
    const sub = await conn.next("subscribe");
    if (server.connections.length === 1) {
      conn.send({ type: "subscribed", event: "news", offset: 1, epoch: "e1" });
      return;
    }
    assert.deepEqual(sub.since, { offset: 1, epoch: "e1" });
    conn.send({ type: "error", code: "subscribe_rate_limited", error: "subscribe rate limit …", event: "news", replyTo: "subscribe" });
    const again = await conn.next("subscribe");
    assert.deepEqual(again.since, { offset: 1, epoch: "e1" });
    conn.send({ type: "subscribed", event: "news", offset: 2, epoch: "e1", recovered: true });
    conn.send({ type: "event", name: "news", data: { n: 2 }, offset: 2 });
  });
  const client = new Switchboard(server.url, { WebSocket, minDelay: 10, maxDelay: 20 });
  try {
    await client.connect();
    const seen = [];
    const sub = client.subscribe("news", (data) => seen.push(data.n));
    await sub.ready;
    const errors = [];
    client.on("error", (e) => errors.push(e.code));
    server.terminateAll();
    await eventually(() => seen.length === 1, 3000, "the event after the refused resubscription");
    assert.deepEqual(seen, [2]);
    assert.equal(sub.state, "subscribed");
    assert.deepEqual(errors, ["subscribe_rate_limited"]);
    let calls = 0;
    const f = () => calls++;
    client.once("custom", f);
    client.off("custom", f);
    client._emit("custom", null);
    assert.equal(calls, 0);
  } finally {
    client.close();
    await server.close();
  }
  const c = new Switchboard("ws://h.example/ws", { WebSocket, sseUrl: "https://h.example/rt/sse" });
  assert.equal(c._sseApi(), "https://h.example/rt/api/sse");
  assert.match(c._sseUrl(null), /^https:\/\/h\.example\/rt\/sse/);
  const d = new Switchboard("ws://h.example/ws", { WebSocket });
  assert.equal(d._sseApi(), "http://h.example/api/sse");
  assert.match(d._sseUrl(null), /^http:\/\/h\.example\/sse/);
});

test("close() and connect() while getToken is pending open one socket, not two", { timeout: 10000 }, async () => {
  const server = await fakeServer((conn) => hello(conn));
  const client = new Switchboard(server.url, {
    WebSocket,
    minDelay: 10,
    maxDelay: 20,
    getToken: () => new Promise((resolve) => setTimeout(() => resolve("t"), 100)),
  });
  try {
    client.connect().catch(() => {});
    client.close();
    await client.connect();
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(server.connections.length, 1);
  } finally {
    client.close();
    await server.close();
  }
});

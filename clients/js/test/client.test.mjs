// The client against real `switchboard` processes (and a private
// redis-server where the test needs a cluster).

import test from "node:test";
import assert from "node:assert/strict";

import { Switchboard } from "../switchboard.js";
import { spawn } from "node:child_process";

import { requireTool, scoped, freePort, eventually, nextEvent, jwt, sleep } from "./harness.mjs";

const WebSocket = requireTool("ws");
const FAST = { WebSocket, minDelay: 100, maxDelay: 1000 };

function client(s, url, options = {}) {
  const c = new Switchboard(url, { ...FAST, ...options });
  s.defer(() => c.close());
  return c;
}

test(
  "connect, state events, subscribe, request, REST publish",
  scoped(async (s) => {
    const node = await s.node("js-basic");
    const c = client(s, node.ws);
    const states = [];
    for (const e of ["connecting", "connected", "disconnected"]) c.on(e, () => states.push(e));
    assert.equal(c.state, "idle");
    await c.connect();
    assert.equal(c.state, "connected");
    assert.match(c.clientId, /^[0-9a-f]{16}$/);
    const got = [];
    const sub = c.subscribe("news", (data, meta) => got.push([meta.name, data]));
    await sub.ready;
    assert.equal(sub.state, "subscribed");
    assert.equal((await node.post("/api/publish", { topic: "news", data: { n: 1 } })).status, 202);
    assert.equal((await node.post("/api/publish", { topic: "news", event: "headline", data: { n: 2 } })).status, 202);
    await eventually(() => got.length === 2, 5000, "two events");
    assert.deepEqual(got, [
      ["news", { n: 1 }],
      ["headline", { n: 2 }],
    ]);
    const r = await c.request("news");
    assert.deepEqual(r.data, { n: 2 });
    const state = await c.request("device");
    assert.equal(state.data.current_app, "clock");
    await assert.rejects(c.request("nothing-here"), (e) => e.code === "no_data");
    sub.unsubscribe();
    c.close();
    assert.equal(c.state, "closed");
    assert.deepEqual(states, ["connecting", "connected", "disconnected"]);
  }),
);

test(
  "reconnects after SIGTERM of its node and resubscribes",
  scoped(async (s) => {
    const port = await freePort();
    let node = await s.node("js-restart", {}, { port });
    const c = client(s, node.ws);
    const got = [];
    const sub = c.subscribe("news", (d) => got.push(d));
    const marks = [];
    sub.on("unrecoverable", (u) => marks.push(["unrecoverable", u.reason]));
    sub.on("recovered", () => marks.push(["recovered"]));
    await c.connect();
    await sub.ready;
    const down = nextEvent(c, "disconnected", 10000);
    await node.stop("SIGTERM");
    const d = await down;
    assert.equal(d.code, 1001, "bare single node: going away");
    assert.equal(d.willReconnect, true);
    assert.equal(c.state, "disconnected");
    node = await s.node("js-restart-2", {}, { port });
    const back = await nextEvent(c, "connected", 10000);
    assert.equal(back.reconnected, true);
    await eventually(() => marks.length > 0, 5000, "a recovery outcome");
    // Embedded mode: a restart starts a new history epoch (or there is no history yet).
    assert.equal(marks[0][0], "unrecoverable");
    await node.post("/api/publish", { topic: "news", data: "after" });
    await eventually(() => got.includes("after"), 5000, "event after the restart");
  }),
);

test(
  "token refusal at the handshake stops; getToken with a new token goes on",
  scoped(async (s) => {
    const secret = "a-test-secret-of-at-least-32-chars!!";
    const node = await s.node("js-auth", { AUTH_JWT_SECRET: secret });
    const bad = client(s, node.ws, { token: "not-a-jwt" });
    const refusal = nextEvent(bad, "disconnected");
    await assert.rejects(bad.connect());
    const r = await refusal;
    assert.equal(r.status, 401);
    assert.equal(r.willReconnect, false);
    assert.equal(bad.state, "closed");

    const good = jwt(secret, { sub: "t", topics: ["*"], publish: ["chat.*"] });
    const tokens = ["expired-or-bad", good];
    const c = client(s, node.ws, { getToken: async () => tokens.shift() ?? good });
    await c.connect();
    assert.equal(c.state, "connected");
    // The token's publish claim lets this client publish.
    const got = [];
    await c.subscribe("chat.room1", (d, m) => got.push([m.name, d])).ready;
    c.publish("chat.room1", { text: "hi" }, { name: "message" });
    await eventually(() => got.length === 1, 5000, "own publication");
    assert.deepEqual(got[0], ["message", { text: "hi" }]);
    // …and not elsewhere: the server's error comes back as an `error` event.
    const err = nextEvent(c, "error");
    c.publish("news", 1);
    assert.equal((await err).code, "forbidden");
  }),
);

test(
  "rate limit: close 1008 stops reconnecting",
  scoped(async (s) => {
    const node = await s.node("js-rate", { WEBSOCKET_RATE_LIMIT: "1", WEBSOCKET_RATE_BURST: "2" });
    const c = client(s, node.ws);
    await c.connect();
    const d = nextEvent(c, "disconnected");
    for (let i = 0; i < 5; i++) c.ping().catch(() => {});
    const info = await d;
    assert.equal(info.code, 1008);
    assert.equal(info.willReconnect, false);
    await sleep(300);
    assert.equal(c.state, "closed");
  }),
);

test(
  "no reconnect storm: 200 clients cut off together spread their returns over the backoff window",
  scoped(async (s) => {
    const port = await freePort();
    let node = await s.node("js-storm", {}, { port });
    const N = 200;
    const minDelay = 200;
    const maxDelay = 3000;
    const clients = [];
    const attempts = new Array(N).fill(0);
    const back = new Array(N).fill(null);
    for (let i = 0; i < N; i++) {
      const c = client(s, node.ws, { minDelay, maxDelay, connectTimeout: 5000 });
      c.on("connecting", () => attempts[i]++);
      clients.push(c);
    }
    await Promise.all(clients.map((c) => c.connect()));
    for (let i = 0; i < N; i++) attempts[i] = 0;
    const cut = Date.now();
    await node.stop("SIGKILL"); // every client sees 1006 at once
    await eventually(() => clients.every((c) => c.state === "disconnected" || c.state === "connecting"), 5000);
    await sleep(1000);
    const restarted = Date.now();
    node = await s.node("js-storm-2", {}, { port });
    clients.forEach((c, i) => c.once("connected", () => (back[i] = Date.now() - restarted)));
    await eventually(() => back.every((t) => t !== null), maxDelay * 3, "all 200 back");
    const sorted = [...back].sort((a, b) => a - b);
    const p10 = sorted[Math.floor(N * 0.1)];
    const p90 = sorted[Math.floor(N * 0.9)];
    // Largest number of reconnects in any 100 ms window.
    let peak = 0;
    for (let i = 0, j = 0; i < N; i++) {
      while (sorted[i] - sorted[j] > 100) j++;
      peak = Math.max(peak, i - j + 1);
    }
    const total = attempts.reduce((a, b) => a + b, 0);
    console.log(
      `storm: cut at ${cut}, all back within ${sorted[N - 1]} ms of the restart; p10 ${p10} ms, p90 ${p90} ms; ` +
        `peak ${peak} reconnects per 100 ms; ${total} connection attempts (${(total / N).toFixed(1)} per client)`,
    );
    assert.ok(sorted[N - 1] <= maxDelay + 2000, `all back within the ceiling (+ slack): ${sorted[N - 1]}`);
    assert.ok(p90 - p10 >= 300, `returns spread out: p10 ${p10}, p90 ${p90}`);
    assert.ok(peak <= N / 2, `no burst: ${peak} in 100 ms`);
    // ~1.2 s down with a 200 ms floor doubling to 3 s: a handful of attempts each, not a loop.
    assert.ok(total <= N * 6, `${total} attempts`);
    const health = (await node.get("/api/health")).body;
    assert.equal(health.connections, N);
  }),
);

// === history (issue: history/recovery on the server) ===

test(
  "history: recovery without loss across a node restart (Redis cluster)",
  scoped(async (s) => {
    const redis = await s.redis();
    const env = { REDIS_URL: redis.url, REDIS_PREFIX: `jsrec${process.pid}`, SHUTDOWN_READINESS_DELAY_MS: "0" };
    const port = await freePort();
    let a = await s.node("js-rec-a", env, { port });
    const b = await s.node("js-rec-b", env);
    const c = client(s, a.ws);
    const got = [];
    const dups = [];
    c.on("duplicate", (m) => dups.push(m.offset));
    const sub = c.subscribe("news", (d, m) => got.push([d.n, m.offset]));
    const recovered = [];
    sub.on("recovered", (r) => recovered.push(r));
    sub.on("unrecoverable", (u) => recovered.push({ unrecoverable: u }));
    await c.connect();
    await sub.ready;
    for (let n = 1; n <= 5; n++) await b.post("/api/publish", { topic: "news", data: { n } });
    await eventually(() => got.length === 5, 5000, "first five");
    await a.stop("SIGTERM");
    // Published while the client's node is down: through node B and through Redis directly.
    for (let n = 6; n <= 8; n++) await b.post("/api/publish", { topic: "news", data: { n } });
    for (let n = 9; n <= 10; n++) {
      const reply = redis.cli("FCALL", "switchboard_publish", "1", "news", JSON.stringify({ event: "news", data: { n } }), env.REDIS_PREFIX);
      assert.match(reply, /^\d+\n\S+$/, `FCALL answers [offset, epoch]: ${reply}`);
    }
    a = await s.node("js-rec-a2", env, { port });
    await eventually(() => got.length >= 10, 10000, "recovered publications");
    await b.post("/api/publish", { topic: "news", data: { n: 11 } });
    await eventually(() => got.length === 11, 5000, "live after recovery");
    assert.deepEqual(
      got.map(([n]) => n),
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    );
    const offsets = got.map(([, o]) => o);
    for (let i = 1; i < offsets.length; i++) assert.equal(offsets[i], offsets[i - 1] + 1, `offsets ${offsets}`);
    assert.equal(recovered.length, 1);
    assert.ok(!recovered[0].unrecoverable, JSON.stringify(recovered[0]));
    // from..to: the offsets replayed (6 to 10), like a gap's from..to.
    assert.deepEqual([recovered[0].from, recovered[0].to], [offsets[5], offsets[9]]);
    assert.deepEqual(dups, []);
  }),
);

test(
  "history: too much missed is unrecoverable; a new epoch is unrecoverable",
  scoped(async (s) => {
    const redis = await s.redis();
    const env = { REDIS_URL: redis.url, REDIS_PREFIX: `jsunr${process.pid}`, HISTORY_SIZE: "5" };
    const port = await freePort();
    let a = await s.node("js-unr-a", env, { port });
    const b = await s.node("js-unr-b", env);
    const c = client(s, a.ws);
    const got = [];
    const sub = c.subscribe("news", (d) => got.push(d.n));
    const outcomes = [];
    sub.on("recovered", () => outcomes.push("recovered"));
    sub.on("unrecoverable", (u) => outcomes.push(["unrecoverable", u.epoch, u.offset]));
    await c.connect();
    await sub.ready;
    await b.post("/api/publish", { topic: "news", data: { n: 1 } });
    await eventually(() => got.length === 1);
    await a.stop("SIGTERM");
    for (let n = 2; n <= 20; n++) await b.post("/api/publish", { topic: "news", data: { n } });
    a = await s.node("js-unr-a2", env, { port });
    await eventually(() => outcomes.length === 1, 10000, "an outcome");
    assert.equal(outcomes[0][0], "unrecoverable");
    const epoch = sub.epoch;
    assert.equal(sub.offset, outcomes[0][2]);
    // Redis loses the history: a new epoch.
    redis.cli("FLUSHALL");
    await b.post("/api/publish", { topic: "news", data: { n: 21 } });
    await eventually(() => got.includes(21), 10000, "the publication after the reset");
    assert.equal(outcomes.length, 2, JSON.stringify(outcomes));
    assert.equal(outcomes[1][0], "unrecoverable");
    assert.notEqual(sub.epoch, epoch, "the new epoch is adopted");
  }),
);

test(
  "a reset of a topic first published after the subscribe is unrecoverable, and what follows is delivered",
  scoped(async (s) => {
    const redis = await s.redis();
    const node = await s.node("js-pending-reset", { REDIS_URL: redis.url, REDIS_PREFIX: `jspr${process.pid}` });
    const c = client(s, node.ws);
    const got = [];
    const marks = [];
    const sub = c.subscribe("fresh", (d) => got.push(d.n));
    sub.on("gap", (g) => marks.push(["gap", g.from, g.to]));
    sub.on("unrecoverable", (u) => marks.push(["unrecoverable", u.epoch, u.offset]));
    c.on("duplicate", (d) => marks.push(["duplicate", d.offset]));
    await c.connect();
    await sub.ready;
    assert.ok(sub.epoch.startsWith("~"), `a pending epoch before the first publication: ${sub.epoch}`);
    for (let n = 1; n <= 3; n++) await node.post("/api/publish", { topic: "fresh", data: { n } });
    await eventually(() => got.length === 3, 10000, "the first three");
    // Redis loses the history: the topic starts a new epoch at offset 1.
    redis.cli("FLUSHALL");
    await node.post("/api/publish", { topic: "fresh", data: { n: 4 } });
    await node.post("/api/publish", { topic: "fresh", data: { n: 5 } });
    await eventually(() => got.includes(5), 10000, `the publications after the reset: ${JSON.stringify(marks)}`);
    assert.deepEqual(got, [1, 2, 3, 4, 5]);
    assert.equal(marks.filter((m) => m[0] === "duplicate").length, 0, JSON.stringify(marks));
    assert.equal(marks[0][0], "unrecoverable", JSON.stringify(marks));
    assert.equal(sub.epoch, marks[0][1], "the new epoch is adopted");
  }),
);

test(
  "after close() and connect() a topic without history reports what may have been missed",
  scoped(async (s) => {
    const node = await s.node("js-close-connect", { HISTORY_TOPICS: "hist.*" });
    const c = client(s, node.ws);
    const marks = [];
    const sub = c.subscribe("plain", () => {});
    sub.on("unrecoverable", (u) => marks.push(u.reason));
    await c.connect();
    await sub.ready;
    c.close();
    await c.connect();
    await eventually(() => marks.length === 1, 10000, "unrecoverable after the reconnect");
    assert.match(marks[0], /keeps no history/);
  }),
);

test(
  "connect() called from a disconnected listener opens one socket, not two",
  scoped(async (s) => {
    const port = await freePort();
    let node = await s.node("js-relisten", {}, { port });
    const c = client(s, node.ws);
    let again = null;
    c.on("disconnected", (d) => {
      if (d.willReconnect) again = c.connect();
    });
    await c.connect();
    await node.stop("SIGKILL");
    await eventually(() => again !== null, 5000, "disconnected");
    node = await s.node("js-relisten-2", {}, { port });
    await again;
    await sleep(1500); // a second socket would have opened by now
    assert.equal((await node.get("/api/health")).body.connections, 1);
  }),
);

test(
  "compact: true (issue 23) gets the same events from array frames, without timestamps",
  scoped(async (s) => {
    const node = await s.node("js-compact");
    // Captures what arrives on the wire.
    const frames = [];
    class Capturing extends WebSocket {
      constructor(url) {
        super(url);
        this.addEventListener("message", (ev) => frames.push(String(ev.data)));
      }
    }
    const c = client(s, node.ws, { compact: true, WebSocket: Capturing });
    const plain = client(s, node.ws);
    const got = { compact: [], plain: [] };
    const record = (list) => (data, meta) => list.push([meta.name, meta.topic, meta.offset, data, typeof meta.timestamp]);
    const subs = [c.subscribe("news", record(got.compact)), plain.subscribe("news", record(got.plain))];
    await Promise.all([c.connect(), plain.connect()]);
    await Promise.all(subs.map((sub) => sub.ready));
    assert.equal((await node.post("/api/publish", { topic: "news", data: { n: 1 } })).status, 202);
    assert.equal((await node.post("/api/publish", { topic: "news", event: "headline", data: "two" })).status, 202);
    await eventually(() => got.compact.length === 2 && got.plain.length === 2, 5000, "two events each");
    assert.deepEqual(
      got.compact,
      got.plain.map(([name, topic, offset, data]) => [name, topic, offset, data, "undefined"]),
    );
    assert.deepEqual(got.plain.map((e) => e[2]), [1, 2], "offsets (every topic keeps history by default)");
    const events = frames.filter((f) => f.startsWith("["));
    assert.equal(events.length, 2, frames.join("\n"));
    assert.match(events[1], /^\[\d+,"two",2,"headline"\]$/);
  }),
);

test(
  "token refresh: refresh() resolves on refreshed (issue 15)",
  scoped(async (s) => {
    const secret = "a-test-secret-of-at-least-32-chars!!";
    const node = await s.node("js-refresh", { AUTH_JWT_SECRET: secret });
    const now = Math.floor(Date.now() / 1000);
    const c = client(s, node.ws, { token: jwt(secret, { sub: "r", exp: now + 60 }) });
    await c.connect();
    const result = await c.refresh(jwt(secret, { sub: "r", exp: now + 3600 }));
    assert.deepEqual(result, { expiresAt: (now + 3600) * 1000, applied: "now" });
    // A bad token: the refusal answers the refresh (replyTo), whatever its sentence.
    await assert.rejects(c.refresh("not-a-jwt"), (e) => e.code === "bad_token" && e.frame.replyTo === "refresh");
  }),
);

test(
  "history: a node restarted twice under a 100/s publisher, every offset exactly once",
  scoped(async (s) => {
    const redis = await s.redis();
    const prefix = `jstwice${process.pid}`;
    const env = { REDIS_URL: redis.url, REDIS_PREFIX: prefix, SHUTDOWN_READINESS_DELAY_MS: "0" };
    const port = await freePort();
    let node = await s.node("js-twice-1", env, { port });
    const c = client(s, node.ws);
    const seen = new Map();
    c.subscribe("ticks", (_d, m) => seen.set(m.offset, (seen.get(m.offset) ?? 0) + 1));
    await c.connect();
    await eventually(() => c.state === "connected", 5000, "connected");
    // One redis-cli fed by a pipe publishes with history at 100/s,
    // independent of the node.
    const publisher = spawn("redis-cli", ["-p", String(redis.port)], { stdio: ["pipe", "ignore", "ignore"] });
    s.defer(() => publisher.kill("SIGKILL"));
    let sent = 0;
    const timer = setInterval(() => {
      sent += 1;
      const env = JSON.stringify({ event: "ticks", data: { n: sent } });
      publisher.stdin.write(`FCALL switchboard_publish 1 ticks '${env}' ${prefix}\n`);
    }, 10);
    s.defer(() => clearInterval(timer));
    for (let round = 2; round <= 3; round++) {
      await sleep(1500);
      await node.stop("SIGTERM");
      await sleep(300);
      node = await s.node(`js-twice-${round}`, env, { port });
    }
    await sleep(1500);
    clearInterval(timer);
    const total = sent;
    await eventually(() => seen.size >= total, 15000, `all ${total} offsets`);
    const twice = [...seen].filter(([, n]) => n > 1).map(([o]) => o);
    const missing = [];
    for (let o = 1; o <= total; o++) if (!seen.has(o)) missing.push(o);
    assert.deepEqual({ missing, twice }, { missing: [], twice: [] });
    assert.equal(seen.size, total);
  }),
);

test(
  "control API: a server-side subscription shows up; close 4000-4499 reconnects, 4500 does not (issue 19)",
  scoped(async (s) => {
    const token = "js-control-api-token";
    const node = await s.node("js-control", { API_TOKEN: token });
    const api = (p, body) => node.post(p, body, { authorization: `Bearer ${token}` });
    const c = client(s, node.ws);
    await c.connect();
    const first = c.clientId;

    // The back end subscribes this connection: a Subscription appears.
    const made = nextEvent(c, "subscription");
    const r = await api("/api/subscribe", { client: first, topic: "alerts" });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.data.reached, 1);
    const sub = await made;
    assert.equal(sub.topic, "alerts");
    assert.equal(sub.serverSide, true);
    await sub.ready;
    assert.equal(sub.state, "subscribed");
    const got = [];
    sub.handler = (data) => got.push(data);
    await node.post("/api/publish", { topic: "alerts", data: { n: 1 } }, { authorization: `Bearer ${token}` });
    await eventually(() => got.length === 1, 5000, "the publication");
    assert.deepEqual(got, [{ n: 1 }]);

    // 4001: the client reconnects, and keeps the subscription (subscribed
    // again with its position, so nothing published meanwhile is lost).
    const down = nextEvent(c, "disconnected");
    assert.equal((await api("/api/disconnect", { client: first, code: 4001, reason: "rebalance" })).body.data.reached, 1);
    const d = await down;
    assert.equal(d.code, 4001);
    assert.equal(d.reason, "rebalance");
    assert.equal(d.willReconnect, true);
    await nextEvent(c, "connected", 10000);
    assert.notEqual(c.clientId, first);
    await eventually(() => sub.state === "subscribed" && c._topics.get("alerts")?.confirmed, 5000, "resubscribed");
    await node.post("/api/publish", { topic: "alerts", data: { n: 2 } }, { authorization: `Bearer ${token}` });
    await eventually(() => got.length === 2, 5000, "the publication after the reconnect");

    // Server-side unsubscribe: the subscription ends with reason "server".
    const ended = nextEvent(sub, "unsubscribed");
    assert.equal((await api("/api/unsubscribe", { client: c.clientId, topic: "alerts" })).body.data.reached, 1);
    assert.deepEqual(await ended, { reason: "server" });
    assert.equal(sub.state, "unsubscribed");

    // 4500: closed for good, no reconnect.
    const final = nextEvent(c, "disconnected");
    let attempts = 0;
    c.on("connecting", () => attempts++);
    assert.equal((await api("/api/disconnect", { client: c.clientId, code: 4500, reason: "banned" })).body.data.reached, 1);
    const f = await final;
    assert.equal(f.code, 4500);
    assert.equal(f.reason, "banned");
    assert.equal(f.willReconnect, false);
    assert.equal(c.state, "closed");
    // Longer than the client's largest backoff (maxDelay 1000 ms here).
    await sleep(1500);
    assert.equal(attempts, 0);
    assert.equal(c.state, "closed");
    const health = await node.get("/api/health");
    assert.equal(health.body.connections, 0);
  }),
);

test(
  "presence: sub.presence(), sub.presenceStats() and the presence option's join/leave handlers",
  scoped(async (s) => {
    const node = await s.node("js-presence", { PRESENCE_TOPICS: "room.*", PRESENCE_DIFF_INTERVAL_MS: "100" });
    const watcher = client(s, node.ws);
    await watcher.connect();
    const joined = new Map();
    const left = new Map();
    const diffs = [];
    const sub = watcher.subscribe("room.1", () => {}, {
      presence: { join: (id, e) => joined.set(id, e), leave: (id, e) => left.set(id, e) },
    });
    sub.on("presence_diff", (d) => diffs.push(d));
    await sub.ready;
    const other = client(s, node.ws);
    await other.connect();
    const otherSub = other.subscribe("room.1");
    await otherSub.ready;
    await eventually(() => joined.has(other.clientId), 5000, "the other client's join");
    assert.deepEqual(joined.get(other.clientId), { user: "", info: null });
    assert.ok(joined.has(watcher.clientId), "its own join too");
    assert.ok(diffs.length >= 1);
    const who = await sub.presence();
    assert.deepEqual(Object.keys(who).sort(), [other.clientId, watcher.clientId].sort());
    assert.deepEqual(await otherSub.presenceStats(), { clients: 2, users: 0 });
    other.close();
    await eventually(() => left.has(other.clientId), 5000, "the other client's leave");
    assert.deepEqual(await watcher.presenceStats("room.1"), { clients: 1, users: 0 });
    await assert.rejects(watcher.presence("news"), (e) => e.code === "no_presence");
  }),
);

test(
  "presence: after its own reconnect the handlers hear who left and who came meanwhile",
  scoped(async (s) => {
    const token = "js-presence-token";
    const node = await s.node("js-presence-back", {
      PRESENCE_TOPICS: "room.*",
      PRESENCE_DIFF_INTERVAL_MS: "100",
      API_TOKEN: token,
    });
    // Away for at least 1.5 s once cut off.
    const watcher = client(s, node.ws, { minDelay: 1500, maxDelay: 1500 });
    await watcher.connect();
    const present = new Map();
    const sub = watcher.subscribe("room.2", () => {}, {
      presence: { join: (id, e) => present.set(id, e), leave: (id) => present.delete(id) },
    });
    await sub.ready;
    const leaver = client(s, node.ws);
    await leaver.connect();
    await leaver.subscribe("room.2").ready;
    await eventually(() => present.has(leaver.clientId), 5000, "the leaver's join");
    const first = watcher.clientId;
    const gone = leaver.clientId;
    const down = nextEvent(watcher, "disconnected");
    const r = await node.post("/api/disconnect", { client: first, code: 4001, reason: "test" }, { authorization: `Bearer ${token}` });
    assert.equal(r.body.data.reached, 1, JSON.stringify(r.body));
    await down;
    // While the watcher is away: one client leaves, another comes.
    leaver.close();
    const comer = client(s, node.ws);
    await comer.connect();
    await comer.subscribe("room.2").ready;
    await eventually(async () => (await comer.presenceStats("room.2")).clients === 1, 5000, "the leave and the join");
    assert.notEqual(watcher.state, "connected", "the watcher came back too early for this test");
    await nextEvent(watcher, "connected", 10000);
    await eventually(
      () => present.has(comer.clientId) && present.has(watcher.clientId) && !present.has(gone) && !present.has(first),
      5000,
      `the handlers' list to be right again (${JSON.stringify([...present.keys()])})`,
    );
  }),
);

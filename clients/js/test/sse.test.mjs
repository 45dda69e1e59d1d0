// The client's Server-Sent Events fallback (`transports: ["websocket",
// "sse"]`) against real nodes whose WebSocket endpoint is off: the same
// subscription API, topics added and removed on a live stream, and
// recovery across a node restart with every publication exactly once.

import test from "node:test";
import assert from "node:assert/strict";

import { Switchboard, sseTopicKey } from "../switchboard.js";
import { requireTool, scoped, freePort, eventually, sleep, jwt, nextEvent } from "./harness.mjs";

const WebSocket = requireTool("ws");

/** A client that falls back to SSE (the nodes' WebSocket is off), closed with the scope. */
function sseClient(s, url, options = {}) {
  const c = new Switchboard(url, {
    WebSocket,
    transports: ["websocket", "sse"],
    minDelay: 100,
    maxDelay: 500,
    ...options,
  });
  s.defer(() => c.close());
  return c;
}

test("SSE topic keys are the server's", () => {
  // The key the server wrote for `ticker` in docs/protocol.md.
  assert.equal(sseTopicKey("ticker"), "qduo37");
});

test(
  "falls back to SSE when the WebSocket cannot be opened; same API, recovery across a restart",
  { timeout: 60_000 },
  scoped(async (s) => {
    const redis = await s.redis();
    const port = await freePort();
    const env = {
      REDIS_URL: redis.url,
      REDIS_PREFIX: "js-sse",
      WEBSOCKET_ENABLED: "false",
      SHUTDOWN_DRAIN_MS: "0",
    };
    let a = await s.node("js-sse-a", env, { port });
    const b = await s.node("js-sse-b", env);
    const c = sseClient(s, `ws://127.0.0.1:${port}/ws`);
    const transports = [];
    c.on("transport", (e) => transports.push(e.transport));
    const got = [];
    const news = c.subscribe("news", (data, meta) => got.push([meta.offset, data.n]));
    await c.connect();
    assert.equal(c.transport, "sse");
    assert.deepEqual(transports, ["sse"]);
    await news.ready;
    for (let n = 1; n <= 3; n++) await b.post("/api/publish", { topic: "news", data: { n } });
    await eventually(() => got.length === 3, 5000, "three events over SSE");

    // A topic added on the live stream (POST to the node holding it), and removed.
    const extra = [];
    const sub = c.subscribe("extra", (data) => extra.push(data.n));
    await sub.ready;
    await b.post("/api/publish", { topic: "extra", data: { n: 1 } });
    await eventually(() => extra.length === 1, 5000, "an event of the added topic");
    sub.unsubscribe();
    await sleep(200);
    await b.post("/api/publish", { topic: "extra", data: { n: 2 } });

    // One-way: a publish is refused with a clear error.
    const errors = [];
    c.on("error", (e) => errors.push(e.code));
    c.publish("news", { n: 0 });
    await eventually(() => errors.includes("unsupported"), 5000, "unsupported publish");
    // An rpc is refused at once, to its own call.
    const started = Date.now();
    await assert.rejects(c.rpc("anything", {}), (e) => e.code === "unsupported");
    assert.ok(Date.now() - started < 1000, "the rpc waited for its timeout");

    // The node goes away; publications continue on the other; it comes back.
    await a.stop("SIGTERM");
    for (let n = 4; n <= 8; n++) await b.post("/api/publish", { topic: "news", data: { n } });
    a = await s.node("js-sse-a2", env, { port });
    await eventually(() => got.length === 8, 10000, "the missed publications");
    await b.post("/api/publish", { topic: "news", data: { n: 9 } });
    await eventually(() => got.length === 9, 5000, "live again");
    assert.deepEqual(
      got.map(([, n]) => n),
      [1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.deepEqual(
      got.map(([o]) => o),
      [1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert.deepEqual(extra, [1]);
  }),
);

test(
  "over SSE a token that expires ends the stream; getToken's next one resumes without a loss",
  { timeout: 60_000 },
  scoped(async (s) => {
    const SECRET = "a-test-secret-of-some-length";
    const node = await s.node("js-sse-token", { AUTH_JWT_SECRET: SECRET, WEBSOCKET_ENABLED: "false" });
    const now = () => Math.floor(Date.now() / 1000);
    const short = jwt(SECRET, { sub: "u1", exp: now() + 2 });
    // Asked before the WebSocket attempt, the SSE one, then after the expiry.
    const tokens = [short, short, jwt(SECRET, { sub: "u1", exp: now() + 600 })];
    let asked = 0;
    const c = sseClient(s, `${node.http}/ws`, {
      getToken: () => tokens[Math.min(asked++, tokens.length - 1)],
    });
    const expired = [];
    c.on("token_expired", (m) => expired.push(m.code));
    const got = [];
    const sub = c.subscribe("news", (data) => got.push(data.n));
    await c.connect();
    await sub.ready;
    await node.post("/api/publish", { topic: "news", data: { n: 1 } });
    await eventually(() => expired.length === 1, 5000, "token_expired");
    await node.post("/api/publish", { topic: "news", data: { n: 2 } });
    await eventually(() => c.state === "connected" && got.length === 2, 5000, "reconnected and resumed");
    await node.post("/api/publish", { topic: "news", data: { n: 3 } });
    await eventually(() => got.length === 3, 5000, "live");
    assert.deepEqual(got, [1, 2, 3]);
    assert.equal(c.transport, "sse");
  }),
);

/**
 * A client over SSE on `news` and `secret` whose first token (3 s) allows
 * both and whose next one only `news`; `expired` settles when the first
 * ends the stream.
 */
async function revokedOnRefresh(s, name, env = {}) {
  const SECRET = "a-test-secret-of-some-length";
  const node = await s.node(name, { AUTH_JWT_SECRET: SECRET, WEBSOCKET_ENABLED: "false", ...env });
  const now = () => Math.floor(Date.now() / 1000);
  const short = jwt(SECRET, { sub: "u1", exp: now() + 3, topics: ["news", "secret"] });
  // Asked before the WebSocket attempt, the SSE one, then after the expiry.
  const tokens = [short, short, jwt(SECRET, { sub: "u1", exp: now() + 600, topics: ["news"] })];
  let asked = 0;
  const c = sseClient(s, `${node.http}/ws`, {
    getToken: () => tokens[Math.min(asked++, tokens.length - 1)],
  });
  const expired = nextEvent(c, "token_expired", 15_000);
  const got = [];
  const news = c.subscribe("news", (data) => got.push(data.n));
  const secret = c.subscribe("secret", () => {});
  const secretErrors = [];
  secret.on("error", (e) => secretErrors.push(e.code));
  await c.connect();
  await Promise.all([news.ready, secret.ready]);
  return { node, c, expired, got, news, secret, secretErrors };
}

test(
  "over SSE a resume whose new token no longer allows a topic ends that subscription alone",
  { timeout: 60_000 },
  scoped(async (s) => {
    const { node, c, expired, got, secret, secretErrors } = await revokedOnRefresh(s, "js-sse-revoked");
    await node.post("/api/publish", { topic: "news", data: { n: 1 } });
    await eventually(() => got.length === 1, 5000, "the first publication");
    await expired;
    await node.post("/api/publish", { topic: "news", data: { n: 2 } });
    await eventually(() => c.state === "connected" && got.length === 2, 5000, "reconnected and resumed");
    await eventually(() => secretErrors.length === 1, 5000, "the revoked topic's error");
    assert.deepEqual(secretErrors, ["forbidden"]);
    assert.equal(secret.state, "unsubscribed");
    await node.post("/api/publish", { topic: "news", data: { n: 3 } });
    await eventually(() => got.length === 3, 5000, "live");
    assert.deepEqual(got, [1, 2, 3]);
    assert.equal(c.transport, "sse");
  }),
);

test(
  "over SSE without history topics the reconnect still counts as a resume: the revoked topic alone is refused",
  { timeout: 60_000 },
  scoped(async (s) => {
    const { node, expired, got, news, secretErrors } = await revokedOnRefresh(s, "js-sse-revoked-nohist", {
      HISTORY_TOPICS: "hist.*",
    });
    await expired;
    await eventually(() => secretErrors.length === 1, 10_000, "the revoked topic's error");
    assert.deepEqual(secretErrors, ["forbidden"]);
    // Without history a publication before the stream's join is not kept:
    // publish until one arrives.
    let n = 0;
    await eventually(
      async () => {
        if (got.length > 0) return true;
        await node.post("/api/publish", { topic: "news", data: { n: ++n } });
        await sleep(200);
        return got.length > 0;
      },
      10_000,
      "live after the reconnect",
    );
    assert.notEqual(news.state, "unsubscribed");
  }),
);

test(
  "publications named like the stream's own events (connected, reconnect, error) are publications",
  { timeout: 30_000 },
  scoped(async (s) => {
    const node = await s.node("js-sse-names", { WEBSOCKET_ENABLED: "false" });
    const c = sseClient(s, `${node.http}/ws`);
    const transports = [];
    c.on("transport", (e) => transports.push(e.transport));
    const got = [];
    const news = c.subscribe("news", (data, meta) => got.push([meta.name, data.n]));
    await c.connect();
    await news.ready;
    const names = ["connected", "reconnect", "error", "subscribed"];
    for (const [n, event] of names.entries()) {
      await node.post("/api/publish", { topic: "news", event, data: { n } });
    }
    await eventually(() => got.length === names.length, 5000, "every publication");
    assert.deepEqual(got, names.map((event, n) => [event, n]));
    // The stream was neither restarted nor lost its session: a topic added
    // on it still works.
    const extra = [];
    const sub = c.subscribe("extra", (data) => extra.push(data.n));
    await sub.ready;
    await node.post("/api/publish", { topic: "extra", data: { n: 1 } });
    await eventually(() => extra.length === 1, 5000, "an event of the added topic");
    assert.deepEqual(transports, ["sse"]);
    assert.equal(c.state, "connected");
  }),
);

test("a stream that goes quiet without closing is taken for dead; one that carries heartbeat comments is not", async () => {
  const { createServer } = await import("node:http");
  const streams = { quiet: 0, beating: 0 };
  const timers = [];
  const server = createServer((req, res) => {
    const kind = req.url.startsWith("/quiet/") ? "quiet" : "beating";
    streams[kind] += 1;
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.write(`data: ${JSON.stringify({ type: "connected", clientId: `c${streams[kind]}`, session: `s${streams[kind]}` })}\n\n`);
    if (kind === "beating") timers.push(setInterval(() => res.write(":\n\n"), 100));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const base = `http://127.0.0.1:${server.address().port}`;
  const options = { WebSocket, transports: ["sse"], minDelay: 50, maxDelay: 100, pingInterval: 100, pingTimeout: 100, sseSilence: 300 };
  const quiet = new Switchboard(`${base}/quiet/ws`, options);
  const beating = new Switchboard(`${base}/beating/ws`, options);
  try {
    const drops = [];
    beating.on("disconnected", (d) => drops.push(d.code));
    await Promise.all([quiet.connect(), beating.connect()]);
    const d = await nextEvent(quiet, "disconnected", 3000);
    assert.equal(d.code, 4000, JSON.stringify(d));
    await eventually(() => streams.quiet >= 2, 3000, "the quiet stream opened again");
    await sleep(600);
    assert.deepEqual(drops, []);
    assert.equal(streams.beating, 1);
  } finally {
    quiet.close();
    beating.close();
    for (const t of timers) clearInterval(t);
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});

test(
  "a topic unsubscribed while the stream opens is not held by the stream nor handed back as a server subscription",
  { timeout: 30_000 },
  scoped(async (s) => {
    const node = await s.node("js-sse-drop", { WEBSOCKET_ENABLED: "false" });
    let dropped = null;
    const fetchThenDrop = async (url, init) => {
      const opening = String(url).includes("/sse?") && dropped === null;
      if (opening) {
        // The stream's URL already names the topic; it is dropped before
        // the stream answers.
        dropped = Date.now();
        await sleep(50);
        a.unsubscribe();
      }
      return fetch(url, init);
    };
    const c = sseClient(s, node.ws, { fetch: fetchThenDrop });
    const handed = [];
    c.on("subscription", (sub) => handed.push(sub.topic));
    const got = [];
    c.on("event", (e) => got.push(e.topic));
    const a = c.subscribe("dropped", () => {});
    const keep = c.subscribe("kept", () => {});
    await c.connect();
    assert.equal(c.transport, "sse");
    await keep.ready;
    assert.ok(dropped !== null, "the stream was opened with the topic in its URL");
    await sleep(300); // the unsubscribe of the stream's own subscription
    await node.post("/api/publish", { topic: "dropped", data: { n: 1 } });
    await node.post("/api/publish", { topic: "kept", data: { n: 2 } });
    await eventually(() => got.includes("kept"), 5000, "the kept topic's event");
    assert.deepEqual(handed, []);
    assert.ok(!got.includes("dropped"), JSON.stringify(got));
  }),
);

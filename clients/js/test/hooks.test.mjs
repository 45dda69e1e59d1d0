// The client against a node whose hooks point at the Flask example back end
// (examples/flask-backend/app.py, run by the tools venv's Python): rpc(),
// connect data and subscribe data; the seed-004 pattern end to end.

import test from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";

import { Switchboard } from "../switchboard.js";
import { ROOT, TOOLS, requireTool, scoped, freePort, eventually } from "./harness.mjs";

const WebSocket = requireTool("ws");

/** Starts the Flask example; stopped when the test ends. */
async function flask(s) {
  const port = await freePort();
  const child = spawn(
    path.join(TOOLS, "venv/bin/python"),
    [path.join(ROOT, "examples/flask-backend/app.py"), "--port", String(port)],
    { cwd: path.join(ROOT, "examples/flask-backend"), stdio: ["ignore", "pipe", "pipe"] },
  );
  let log = "";
  child.stdout.on("data", (c) => (log += c));
  child.stderr.on("data", (c) => (log += c));
  s.defer(() => child.kill("SIGKILL"));
  const base = `http://127.0.0.1:${port}`;
  await eventually(
    async () => {
      try {
        return (await fetch(`${base}/healthz`)).ok;
      } catch {
        return false;
      }
    },
    20000,
    `the Flask example to start:\n${log}`,
  );
  return {
    base,
    /** Signs `user` in; the `Cookie` header value. */
    async login(user) {
      const res = await fetch(`${base}/login?user=${user}`);
      assert.equal(res.status, 200);
      return res.headers.get("set-cookie").split(";")[0];
    },
    hooks: {
      PROXY_CONNECT_URL: `${base}/switchboard/connect`,
      PROXY_HEADERS: "Cookie",
      PROXY_SUBSCRIBE_URL: `${base}/switchboard/subscribe`,
      PROXY_SUBSCRIBE_TOPICS: "room.*",
      PROXY_PUBLISH_URL: `${base}/switchboard/publish`,
      PROXY_PUBLISH_TOPICS: "chat.*",
      PROXY_RPC_URL: `${base}/switchboard/rpc`,
    },
  };
}

/** A `ws` WebSocket that sends the session cookie, as a browser would. */
function withCookie(cookie) {
  return class extends WebSocket {
    constructor(url) {
      super(url, { headers: { Cookie: cookie } });
    }
  };
}

function client(s, url, options) {
  const c = new Switchboard(url, { minDelay: 100, maxDelay: 1000, ...options });
  s.defer(() => c.close());
  return c;
}

test(
  "seed 004 end to end: rpc('your_action') receives action_result data from the Flask back end",
  scoped(async (s) => {
    const app = await flask(s);
    const node = await s.node("js-hooks-rpc", app.hooks);
    const sb = client(s, node.ws, { WebSocket: withCookie(await app.login("alice")), connectData: { device: "kiosk" } });
    await sb.connect();
    const result = await sb.rpc("your_action", { item: 42 });
    assert.equal(result.type, "action_result");
    assert.deepEqual(result.data.echo, { item: 42 });
    assert.equal(result.data.user, "alice");
    assert.equal(result.data.client, sb.clientId);
    // Concurrent calls each get their own answer.
    const many = await Promise.all(Array.from({ length: 20 }, (_, i) => sb.rpc("your_action", { i })));
    assert.deepEqual(
      many.map((r) => r.data.echo.i),
      Array.from({ length: 20 }, (_, i) => i),
    );
    // Connect data reached the connect hook (the example keeps it in info).
    const who = await sb.rpc("whoami");
    assert.deepEqual(who.info, { name: "Alice", connectData: { device: "kiosk" } });
    // The back end's error.
    await assert.rejects(sb.rpc("nope", {}), (e) => {
      assert.equal(e.code, "rpc_failed");
      assert.equal(e.backendCode, 404);
      assert.equal(e.message, "unknown method nope");
      return true;
    });
    sb.close();
    await assert.rejects(sb.rpc("your_action", {}), /not connected/);
  }),
);

test(
  "getConnectData is asked before every connect; subscribe data reaches the subscribe hook",
  scoped(async (s) => {
    const app = await flask(s);
    const node = await s.node("js-hooks-data", app.hooks);
    let calls = 0;
    const sb = client(s, node.ws, {
      WebSocket: withCookie(await app.login("alice")),
      getConnectData: async () => ({ attempt: ++calls }),
    });
    await sb.connect();
    assert.deepEqual((await sb.rpc("whoami")).info.connectData, { attempt: 1 });
    sb.close();
    await sb.connect();
    assert.deepEqual((await sb.rpc("whoami")).info.connectData, { attempt: 2 });

    const member = sb.subscribe("room.1");
    await member.ready;
    const refused = sb.subscribe("room.2");
    await assert.rejects(refused.ready, (e) => {
      assert.equal(e.code, "forbidden");
      assert.equal(e.message, "alice is not a member of room.2");
      return true;
    });
    const invited = sb.subscribe("room.2", () => {}, { data: { invite: "sesame" } });
    await invited.ready;
    assert.equal(invited.state, "subscribed");
  }),
);

test(
  "a connection the connect hook refuses stops with the HTTP status",
  scoped(async (s) => {
    const app = await flask(s);
    const node = await s.node("js-hooks-refused", app.hooks);
    const sb = client(s, node.ws, { WebSocket });
    await assert.rejects(sb.connect(), (e) => {
      assert.equal(e.status, 401);
      return true;
    });
    assert.equal(sb.state, "closed");
  }),
);

// Test harness for the JavaScript client and the browser tests, in the style
// of tests/common/mod.rs: real `switchboard` processes and a private
// `redis-server` on free loopback ports; nodes report their address in the
// "listening on" log line (no sleeping to wait for start-up); every process
// is killed when the test process ends, and its log is printed on failure.
//
// Env: SWITCHBOARD_BIN (default target/debug/switchboard),
//      SWITCHBOARD_TOOLS (default .tools; npm packages in $SWITCHBOARD_TOOLS/node).

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { createRequire } from "node:module";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.SWITCHBOARD_BIN ?? path.join(ROOT, "target/debug/switchboard");
export const TOOLS = process.env.SWITCHBOARD_TOOLS ?? path.join(ROOT, ".tools");

/** `require` for the npm packages scripts/test installed into .tools/node. */
export const requireTool = createRequire(path.join(TOOLS, "node", "package.json"));

const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
});

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` every 25 ms until it returns a truthy value or `timeout` ms pass. */
export async function eventually(f, timeout = 5000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(25);
  }
}

// === redis-server ===

export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(path.join(tmpdir(), "sb-js-redis-"));
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore" },
  );
  children.add(child);
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    cli: (...args) =>
      execFileSync("redis-cli", ["-p", String(port), ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim(),
    stop() {
      child.kill("SIGKILL");
      children.delete(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await eventually(
    () => {
      try {
        return redis.cli("PING") === "PONG";
      } catch {
        return false;
      }
    },
    10000,
    `redis-server on ${port}`,
  );
  return redis;
}

// === switchboard ===

/**
 * Starts a node (HOST=127.0.0.1, PORT=0 unless `port`, no mock events) and
 * waits for its "listening on" line. A setting given as `null` in `env` is
 * left unset (the binary's default).
 */
export async function startNode(name, env = {}, { port = 0 } = {}) {
  const settings = {
    PATH: process.env.PATH,
    HOST: "127.0.0.1",
    PORT: String(port),
    NODE_ID: name,
    WEBSOCKET_MOCK_EVENTS: "[]",
    RUST_LOG: "info",
    SHUTDOWN_GRACE_MS: "5000",
    ...env,
  };
  for (const [k, v] of Object.entries(settings)) if (v === null) delete settings[k];
  const child = spawn(BIN, [], {
    env: settings,
    stdio: ["ignore", "ignore", "pipe"],
  });
  children.add(child);
  let log = "";
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node ${name} did not start:\n${log}`)), 30000);
    let buf = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      buf += chunk;
      const m = /listening on http:\/\/(\S+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        buf = "";
        resolve(m[1]);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`node ${name} exited with ${code}:\n${log}`));
    });
  });
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const node = {
    name,
    addr,
    port: Number(addr.split(":").pop()),
    http: `http://${addr}`,
    ws: `ws://${addr}/ws`,
    get log() {
      return log;
    },
    pid: child.pid,
    exited,
    signal(sig) {
      child.kill(sig);
    },
    async stop(sig = "SIGTERM") {
      if (child.exitCode === null && child.signalCode === null) child.kill(sig);
      const r = await exited;
      children.delete(child);
      return r;
    },
    async get(p, headers = {}) {
      const res = await fetch(`http://${addr}${p}`, { headers });
      return { status: res.status, body: await res.json().catch(() => null) };
    },
    async post(p, body, headers = {}) {
      const res = await fetch(`http://${addr}${p}`, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify(body),
      });
      return { status: res.status, body: await res.json().catch(() => null) };
    },
  };
  return node;
}

/**
 * Wraps a test body: `scoped(async (s) => { const n = await s.node("a"); … })`.
 * Nodes, redis-servers and clients made through `s` are stopped when the
 * test ends; the nodes' logs are printed when it fails.
 */
export function scoped(body) {
  return async (t) => {
    const s = {
      nodes: [],
      redises: [],
      closers: [],
      async node(name, env, opts) {
        const n = await startNode(name, env, opts);
        this.nodes.push(n);
        return n;
      },
      async redis() {
        const r = await startRedis();
        this.redises.push(r);
        return r;
      },
      defer(fn) {
        this.closers.push(fn);
      },
    };
    try {
      await body(s, t);
    } catch (err) {
      for (const n of s.nodes) console.error(`--- node ${n.name} (${n.addr}) log ---\n${n.log}`);
      throw err;
    } finally {
      for (const fn of s.closers.reverse()) {
        try {
          await fn();
        } catch {
          /* best effort */
        }
      }
      for (const n of s.nodes) await n.stop("SIGKILL");
      for (const r of s.redises) r.stop();
    }
  };
}

/** An HS256 JWT for `claims`, signed with `secret` (tests only). */
export function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const sig = createHmac("sha256", secret).update(head).digest("base64url");
  return `${head}.${sig}`;
}

/** Resolves with the first `event` emitted by `emitter` (rejects after `timeout` ms). */
export function nextEvent(emitter, event, timeout = 5000, filter = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, fn);
      reject(new Error(`no ${event} within ${timeout} ms`));
    }, timeout);
    const fn = (arg) => {
      if (!filter(arg)) return;
      clearTimeout(timer);
      emitter.off(event, fn);
      resolve(arg);
    };
    emitter.on(event, fn);
  });
}

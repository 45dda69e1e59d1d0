// Chromium's own EventSource on 2 nodes "behind nothing": a tiny
// round-robin HTTP proxy in this test picks a node per request (a node that
// refuses, or answers 503 while it drains, is skipped), so nothing is
// sticky. A page follows 3 topics while 3 publishers run at 50/s; the node
// holding its stream gets SIGTERM (and comes back), then the other node is
// restarted. The page must end with every publication of every topic
// exactly once, in order, with no console error: EventSource's own
// reconnects and Last-Event-ID do the rest.

import test from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { eventually, freePort, requireTool, scoped, sleep } from "../../clients/js/test/harness.mjs";

const { chromium } = requireTool("playwright-core");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TOPICS = ["t1", "t2", "t3"];

const PAGE = `<!doctype html><meta charset="utf-8"><title>sse</title><script>
window.got = { t1: [], t2: [], t3: [] };
window.gaps = [];
window.errors = [];
window.sessions = [];
const es = new EventSource("/sse?topic=t1&topic=t2&topic=t3");
es.addEventListener("connected", (e) => window.sessions.push(JSON.parse(e.data).session));
for (const t of ["t1", "t2", "t3"]) es.addEventListener(t, (e) => window.got[t].push(JSON.parse(e.data).data.n));
es.addEventListener("gap", (e) => window.gaps.push(JSON.parse(e.data)));
// Server "error" events carry data; the connection's own have none.
es.addEventListener("error", (e) => { if (e.data) window.errors.push(e.data); });
</script>`;

/** Forwards each request to the next node that answers (not 503). */
function roundRobin(nodes) {
  let next = 0;
  const server = http.createServer((req, res) => {
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
      return;
    }
    const tryNode = (left) => {
      if (left === 0) {
        res.writeHead(502).end();
        return;
      }
      const node = nodes[next++ % nodes.length];
      const up = http.request(
        { host: "127.0.0.1", port: node.port, path: req.url, method: req.method, headers: req.headers },
        (r) => {
          if (r.statusCode === 503) {
            r.resume();
            tryNode(left - 1);
            return;
          }
          res.writeHead(r.statusCode, r.headers);
          r.pipe(res);
          req.once("close", () => r.destroy());
        },
      );
      up.on("error", () => {
        if (!res.headersSent) tryNode(left - 1);
        else res.destroy();
      });
      up.end();
    };
    tryNode(nodes.length * 2);
  });
  return server;
}

test(
  "Chromium EventSource across SIGTERM and a restart of 2 nodes: every publication once, in order",
  { timeout: 120_000 },
  scoped(async (s) => {
    const redis = await s.redis();
    const ports = [await freePort(), await freePort()];
    const proxyPort = await freePort();
    const origin = `http://127.0.0.1:${proxyPort}`;
    const env = {
      REDIS_URL: redis.url,
      REDIS_PREFIX: "sse-browser",
      SHUTDOWN_DRAIN_MS: "300",
      SHUTDOWN_READINESS_DELAY_MS: "0",
      HISTORY_SIZE: "5000",
      CORS_ALLOWED_ORIGINS: origin,
    };
    const start = (i) => s.node(`sse-${"ab"[i]}`, env, { port: ports[i] });
    const nodes = [await start(0), await start(1)];
    const targets = ports.map((port) => ({ port }));
    const proxy = roundRobin(targets);
    await new Promise((r) => proxy.listen(proxyPort, "127.0.0.1", r));
    s.defer(() => new Promise((r) => { proxy.closeAllConnections(); proxy.close(r); }));

    const dir = mkdtempSync(path.join(tmpdir(), "sb-chromium-"));
    const context = await chromium.launchPersistentContext(dir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
    });
    s.defer(async () => {
      await context.close();
      rmSync(dir, { recursive: true, force: true });
    });
    const page = await context.newPage();
    const consoleErrors = [];
    page.on("console", (m) => {
      if (m.type() === "error") consoleErrors.push(m.text());
    });
    page.on("pageerror", (e) => consoleErrors.push(String(e)));

    // CORS: a page of an allowed origin reads a node's stream directly.
    await page.goto(`${origin}/`);
    const cross = await page.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const es = new EventSource(url);
          setTimeout(() => reject(new Error("no subscribed event cross-origin")), 5000);
          es.addEventListener("subscribed", (e) => {
            es.close();
            resolve(JSON.parse(e.data).event);
          });
        }),
      `${nodes[0].http}/sse/cors-check`,
    );
    assert.equal(cross, "cors-check");

    await eventually(async () => (await page.evaluate(() => window.sessions.length)) >= 1, 10000, "page connected");
    const holder = async () => {
      for (let i = 0; i < 2; i++) {
        const res = await fetch(`${nodes[i].http}/metrics`).catch(() => null);
        const text = res ? await res.text() : "";
        if (/switchboard_connections\{transport="sse"\} 1\b/.test(text)) return i;
      }
      return -1;
    };
    await eventually(async () => (await holder()) >= 0, 5000, "a node holds the stream");

    // 3 publishers, 50/s each, always to a node that is not being stopped.
    let target = 0;
    let publishing = true;
    const sent = { t1: 0, t2: 0, t3: 0 };
    const publisher = async (topic) => {
      const began = Date.now();
      while (publishing) {
        const n = sent[topic] + 1;
        const res = await fetch(`${nodes[target].http}/api/publish`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ topic, data: { n } }),
        });
        assert.ok(res.status === 200 || res.status === 202, `publish ${topic} ${n}: ${res.status}`);
        sent[topic] = n;
        await sleep(Math.max(0, began + n * 20 - Date.now()));
      }
    };
    let first = await holder();
    target = 1 - first;
    const publishers = TOPICS.map(publisher);
    await sleep(1000);

    // The node holding the stream goes away; it comes back on its port.
    const sessions = await page.evaluate(() => window.sessions.length);
    await nodes[first].stop("SIGTERM");
    await eventually(async () => (await page.evaluate(() => window.sessions.length)) > sessions, 10000, "reconnected");
    nodes[first] = await start(first);
    await sleep(1000);

    // Then the other one is restarted.
    const other = 1 - first;
    target = first;
    const sessions2 = await page.evaluate(() => window.sessions.length);
    await nodes[other].stop("SIGTERM");
    await eventually(async () => (await page.evaluate(() => window.sessions.length)) > sessions2, 10000, "reconnected again");
    nodes[other] = await start(other);
    await sleep(1000);

    publishing = false;
    await Promise.all(publishers);
    const want = (t) => Array.from({ length: sent[t] }, (_, i) => i + 1);
    await eventually(
      async () => {
        const got = await page.evaluate(() => window.got);
        return TOPICS.every((t) => got[t].length >= sent[t]);
      },
      15000,
      "every publication reached the page",
    );
    const got = await page.evaluate(() => window.got);
    const gaps = await page.evaluate(() => window.gaps);
    const errors = await page.evaluate(() => window.errors);
    console.log("sent (50/s each)", sent, "streams", await page.evaluate(() => window.sessions.length));
    for (const t of TOPICS) assert.deepEqual(got[t], want(t), `${t}: exactly once, in order`);
    assert.deepEqual(gaps, []);
    assert.deepEqual(errors, []);
    assert.deepEqual(consoleErrors, []);
  }),
);

// The dashboard in a real browser: Debian's headless Chromium
// (/usr/bin/chromium) driven by playwright-core, against real switchboard
// processes and a private redis-server. Screenshots go to
// target/test-output/ (SWITCHBOARD_TEST_OUTPUT overrides).

import test from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { ROOT, requireTool, scoped, freePort, eventually } from "../../clients/js/test/harness.mjs";

const { chromium } = requireTool("playwright-core");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const OUT = process.env.SWITCHBOARD_TEST_OUTPUT ?? path.join(ROOT, "target/test-output");
mkdirSync(OUT, { recursive: true });

/** A fresh Chromium profile; every request, console message and failure is recorded. */
async function browser(s, viewport = { width: 1400, height: 900 }) {
  const dir = mkdtempSync(path.join(tmpdir(), "sb-chromium-"));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport,
  });
  s.defer(async () => {
    await context.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const record = { requests: [], console: [], failures: [], badResponses: [] };
  context.on("request", (r) => record.requests.push(r.url()));
  context.on("requestfailed", (r) => record.failures.push(`${r.url()} ${r.failure()?.errorText}`));
  context.on("response", (r) => {
    if (r.status() >= 400) record.badResponses.push(`${r.status()} ${r.url()}`);
  });
  return { context, record };
}

async function open(context, record, node) {
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") record.console.push(`${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => record.console.push(`pageerror: ${e.message}`));
  page.on("websocket", (ws) => record.requests.push(ws.url()));
  await page.goto(`${node.http}/`);
  await page.locator('#connection-status[data-state="live"]').waitFor({ timeout: 10000 });
  await page.locator('#apps button[aria-pressed="true"]').waitFor({ timeout: 10000 });
  return page;
}

test(
  "dashboard routes: assets embedded, DASHBOARD_ENABLED=false turns them off, /api/frame stays",
  scoped(async (s) => {
    const on = await s.node("dash-on");
    for (const [p, type] of [
      ["/", "text/html"],
      ["/assets/app.js", "text/javascript"],
      ["/assets/switchboard.js", "text/javascript"],
      ["/assets/style.css", "text/css"],
      ["/assets/favicon.svg", "image/svg+xml"],
      ["/favicon.ico", "image/svg+xml"],
    ]) {
      const res = await fetch(`${on.http}${p}`);
      assert.equal(res.status, 200, p);
      assert.ok(res.headers.get("content-type").startsWith(type), `${p}: ${res.headers.get("content-type")}`);
      assert.match(res.headers.get("content-security-policy"), /default-src 'none'/);
    }
    const frame = (await on.get("/api/frame")).body.data;
    assert.equal(frame.width, 64);
    assert.equal(frame.height, 32);
    assert.equal(frame.pixels.length, 64 * 32 * 6);
    assert.equal(frame.app, "clock");
    // HH:MM in tom-thumb: four digits of at most 3×5 pixels and a colon.
    assert.ok(frame.litPixels > 20 && frame.litPixels <= 4 * 15 + 2, `${frame.litPixels} lit pixels`);
    assert.equal(typeof frame.t, "number");
    const off = await s.node("dash-off", { DASHBOARD_ENABLED: "false" });
    assert.equal((await fetch(`${off.http}/`)).status, 404);
    assert.equal((await fetch(`${off.http}/assets/app.js`)).status, 404);
    assert.equal((await off.get("/api/frame")).status, 200);
  }),
);

test(
  "two nodes, two pages: commands, brightness, inspector, nothing leaves the node",
  scoped(async (s) => {
    const redis = await s.redis();
    const prefix = `dash${process.pid}`;
    const env = { REDIS_URL: redis.url, REDIS_PREFIX: prefix, PRESENCE_TOPICS: "room.*", PRESENCE_DIFF_INTERVAL_MS: "100" };
    const a = await s.node("dash-a", env);
    const b = await s.node("dash-b", env);
    await eventually(async () => (await a.get("/api/health")).body.nodes?.length === 2, 10000, "both nodes registered");
    const { context, record } = await browser(s);
    const pageA = await open(context, record, a);
    const pageB = await open(context, record, b);

    // Both pages show the cluster and which node they are on.
    await eventually(async () => (await pageA.locator("#nodes tbody tr").count()) === 2, 5000, "two nodes listed");
    assert.equal(await pageA.locator("#node-id").textContent(), "dash-a");
    assert.equal(await pageB.locator("#node-id").textContent(), "dash-b");
    assert.match(await pageA.locator("#nodes tbody").textContent(), /leader/);

    // An app button on page A: the board changes on every node, page B within 1 s.
    const started = Date.now();
    await pageA.getByRole("button", { name: "stars", exact: true }).click();
    await pageB.locator('#apps button[data-app="stars"][aria-pressed="true"]').waitFor({ timeout: 1000 });
    const seenAfter = Date.now() - started;
    await pageB.locator('#preview[data-app="stars"]').waitFor({ timeout: 1000 });
    assert.equal(await pageB.getByRole("button", { name: "clock", exact: true }).getAttribute("aria-pressed"), "false");
    for (const n of [a, b]) {
      await eventually(async () => (await n.get("/api/state")).body.data.current_app === "stars", 2000, `stars on ${n.name}`);
    }
    console.log(`app switch on node A seen on page B after ${seenAfter} ms`);

    // The Brightness slider.
    await pageA.getByLabel("Brightness").fill("40");
    await eventually(async () => (await b.get("/api/state")).body.data.settings.brightness === 40, 3000, "brightness 40");
    await pageB.locator('#preview[data-brightness="40"]').waitFor({ timeout: 2000 });
    assert.equal(await pageB.getByLabel("Brightness").inputValue(), "40");

    // The topic inspector on page B shows a publication made with redis-cli.
    await pageB.getByLabel("Topic", { exact: true }).fill("inspect-me");
    await pageB.getByRole("button", { name: "Subscribe" }).click();
    await pageB.locator('#inspector-log li[data-topic="inspect-me"][data-kind="subscribed"]').waitFor({ timeout: 5000 });
    redis.cli("PUBLISH", `${prefix}:t:inspect-me`, JSON.stringify({ event: "x", data: { v: 42 } }));
    await pageB.locator('#inspector-log li[data-kind="event"]', { hasText: '"v":42' }).waitFor({ timeout: 3000 });
    // With history, FCALL publishes with an offset, which the inspector shows.
    const [offset] = redis
      .cli("FCALL", "switchboard_publish", "1", "inspect-me", JSON.stringify({ event: "y", data: { v: 43 } }), prefix)
      .split("\n");
    await pageB.locator('#inspector-log li[data-kind="event"]', { hasText: `y #${offset} {"v":43}` }).waitFor({ timeout: 3000 });
    // …and one made with the page's own publish form on page A.
    await pageA.getByLabel("Publish topic").fill("inspect-me");
    await pageA.getByLabel("Data (JSON)").fill('{"from":"page A"}');
    await pageA.getByRole("button", { name: "Publish test event" }).click();
    await pageB.locator('#inspector-log li[data-kind="event"]', { hasText: "page A" }).waitFor({ timeout: 3000 });

    // Presence: both pages inspect a presence topic; each shows 2 clients,
    // 0 users (anonymous pages) and who they are, page A's client among them.
    for (const pg of [pageA, pageB]) {
      await pg.getByLabel("Topic", { exact: true }).fill("room.dash");
      await pg.getByRole("button", { name: "Subscribe", exact: true }).click();
    }
    const clientA = await pageA.locator("#client-id").textContent();
    for (const pg of [pageA, pageB]) {
      const entry = pg.locator('#inspected-topics li[data-topic="room.dash"][data-clients="2"]');
      await entry.waitFor({ timeout: 5000 });
      assert.equal(await entry.getAttribute("data-users"), "0");
      assert.match(await entry.locator(".presence-counts").textContent(), /^2 clients · 0 users$/);
      await pg.locator(`#inspected-topics li[data-topic="room.dash"] .presence-who li[data-client="${clientA}"]`).waitFor({ timeout: 5000 });
      assert.equal(await entry.locator(".presence-who li").count(), 2);
    }
    // Page A leaves: page B shows one client.
    await pageA.getByRole("button", { name: "Unsubscribe from room.dash" }).click();
    await pageB.locator('#inspected-topics li[data-topic="room.dash"][data-clients="1"]').waitFor({ timeout: 5000 });
    // A topic without presence shows no counts.
    assert.equal(await pageB.locator('#inspected-topics li[data-topic="inspect-me"] .presence-counts').textContent(), "");

    await pageA.screenshot({ path: path.join(OUT, "dashboard-node-a.png"), fullPage: true });
    await pageB.screenshot({ path: path.join(OUT, "dashboard-node-b.png"), fullPage: true });

    // Nothing left the nodes, nothing failed, nothing was logged as an error.
    const allowed = [a.addr, b.addr];
    const foreign = record.requests.filter((u) => !allowed.some((addr) => u.startsWith(`http://${addr}/`) || u.startsWith(`ws://${addr}/`)));
    assert.deepEqual(foreign, [], "every request goes to the node");
    assert.ok(record.requests.some((u) => u.endsWith("/assets/switchboard.js")), "the page uses the official client");
    assert.deepEqual(record.failures, []);
    assert.deepEqual(record.badResponses, []);
    assert.deepEqual(record.console, []);
  }),
);

test(
  "the page shows reconnecting while its node is down and recovers on its own",
  scoped(async (s) => {
    const port = await freePort();
    let node = await s.node("dash-restart", {}, { port });
    const { context, record } = await browser(s);
    const page = await open(context, record, node);
    await node.stop("SIGTERM");
    await page.locator('#connection-status[data-state="reconnecting"]').waitFor({ timeout: 5000 });
    await page.screenshot({ path: path.join(OUT, "dashboard-reconnecting.png") });
    node = await s.node("dash-restart-2", {}, { port });
    await page.locator('#connection-status[data-state="recovered"]').waitFor({ timeout: 10000 });
    // Live again: a command made elsewhere shows up.
    await node.post("/api/switch", { app: "scroll_text" });
    await page.locator('#apps button[data-app="scroll_text"][aria-pressed="true"]').waitFor({ timeout: 2000 });
    await page.locator('#preview[data-app="scroll_text"]').waitFor({ timeout: 2000 });
  }),
);

test(
  "with API_TOKEN and ADMIN_TOKEN the page asks for them and keeps them in sessionStorage only",
  scoped(async (s) => {
    const apiToken = "api-token-for-the-browser-test";
    const adminToken = "admin-token-for-the-browser-test";
    const node = await s.node("dash-tokens", { API_TOKEN: apiToken, ADMIN_TOKEN: adminToken });
    const { context, record } = await browser(s);
    const page = await open(context, record, node);
    await page.locator("#tokens").waitFor({ state: "visible", timeout: 5000 });
    assert.equal(await page.locator("#cluster-totals").textContent(), "", "no admin call without the token");
    await page.getByLabel("API token").fill(apiToken);
    await page.getByLabel("Admin token").fill(adminToken);
    await page.getByRole("button", { name: "Use tokens" }).click();
    await page.getByRole("button", { name: "scroll_text", exact: true }).click();
    await page.locator('#apps button[data-app="scroll_text"][aria-pressed="true"]').waitFor({ timeout: 3000 });
    assert.equal((await node.get("/api/state")).body.data.current_app, "scroll_text");
    await page.locator("#cluster-totals", { hasText: "leader dash-tokens" }).waitFor({ timeout: 5000 });
    const storage = await page.evaluate(() => ({
      session: Object.keys(sessionStorage).sort(),
      local: Object.keys(localStorage),
      cookies: document.cookie,
    }));
    assert.deepEqual(storage, { session: ["switchboard.adminToken", "switchboard.apiToken"], local: [], cookies: "" });
    assert.deepEqual(record.badResponses, [], "no request was refused");
  }),
);

test(
  "the live board: scroll_text moves between screenshots, the activity chart, nothing cut off at 1280 px",
  scoped(async (s) => {
    const redis = await s.redis();
    const prefix = `live${process.pid}`;
    const env = { REDIS_URL: redis.url, REDIS_PREFIX: prefix, WEBSOCKET_MOCK_EVENTS: '[{"name":"ticker","interval":250,"data":{"p":1}}]' };
    // Node ids as long as real pod names, to load the node table.
    const a = await s.node("switchboard-7d9f8c6b5-x2k4p", env);
    const b = await s.node("switchboard-7d9f8c6b5-q8m3n", env);
    await eventually(async () => (await a.get("/api/health")).body.nodes?.length === 2, 10000, "both nodes registered");
    const { context, record } = await browser(s, { width: 1280, height: 900 });
    const page = await open(context, record, a);
    await page.locator("#frame-source", { hasText: "live stream" }).waitFor({ timeout: 5000 });
    // Another page's subscription on node B adds deliveries there.
    const other = await open(context, record, b);
    await other.getByLabel("Topic", { exact: true }).fill("ticker");
    await other.getByRole("button", { name: "Subscribe" }).click();

    await a.post("/api/config", { app: "scroll_text", config: { text: "HELLO", speed: 20 } });
    await a.post("/api/switch", { app: "scroll_text" });
    await page.locator('#preview[data-app="scroll_text"]').waitFor({ timeout: 3000 });
    const board = page.locator("#preview");
    // Read back as PNG data (no getImageData: Chromium warns about repeated readbacks).
    const pixels = () => page.evaluate(() => document.getElementById("preview").toDataURL());
    await eventually(async () => Number(await page.locator("#lit-pixels").textContent()) > 0, 3000, "text on the board");
    const shot1 = await board.screenshot({ path: path.join(OUT, "board-1.png") });
    const px1 = await pixels();
    await new Promise((r) => setTimeout(r, 1000));
    const shot2 = await board.screenshot({ path: path.join(OUT, "board-2.png") });
    const px2 = await pixels();
    assert.notDeepEqual(shot1, shot2, "the board changed between two screenshots 1 s apart");
    assert.notEqual(px1, px2);

    // The activity chart: samples for both nodes, deliveries on node B.
    await eventually(async () => Number(await page.locator("#chart").getAttribute("data-samples")) >= 3, 10000, "chart samples");
    const now = await page.locator("#chart-now").textContent();
    assert.match(now, /x2k4p [\d.]+ deliveries\/s, \d+ connection/);
    assert.match(now, /q8m3n [\d.]+ deliveries\/s, \d+ connection/);
    await eventually(
      async () => /q8m3n ([1-9]\d*\.\d|0\.[1-9])/.test(await page.locator("#chart-now").textContent()),
      10000,
      "node B delivers",
    );
    const drawn = await page.evaluate(() => {
      const c = document.getElementById("chart");
      const blank = document.createElement("canvas");
      blank.width = c.width;
      blank.height = c.height;
      return c.toDataURL() !== blank.toDataURL();
    });
    assert.ok(drawn, "the chart is drawn");

    // Nothing cut off at 1280 px: every cell of the node table within the
    // page and within its own box, no horizontal scrolling anywhere.
    const layout = await page.evaluate(() => {
      const width = document.documentElement.clientWidth;
      const bad = [];
      for (const cell of document.querySelectorAll("#nodes th, #nodes td")) {
        const r = cell.getBoundingClientRect();
        if (r.right > width || r.left < 0) bad.push(`${cell.textContent} at ${r.left}..${r.right}`);
        if (cell.scrollWidth > cell.clientWidth + 1) bad.push(`${cell.textContent} overflows (${cell.scrollWidth} > ${cell.clientWidth})`);
      }
      for (const el of document.querySelectorAll("main > section, #nodes, #activity, #app-config")) {
        if (el.scrollWidth > el.clientWidth + 1) bad.push(`${el.id} scrolls (${el.scrollWidth} > ${el.clientWidth})`);
        if (el.getBoundingClientRect().right > width) bad.push(`${el.id} ends past the page`);
      }
      return { width, pageWidth: document.documentElement.scrollWidth, bad };
    });
    assert.equal(layout.width, 1280);
    assert.ok(layout.pageWidth <= 1280, `page is ${layout.pageWidth} px wide`);
    assert.deepEqual(layout.bad, []);
    assert.equal(await page.locator("#nodes tbody tr").count(), 2);

    // The board (the clock in 10x20), the chart and the inspector in one
    // picture; kept as docs/dashboard.png when SWITCHBOARD_DOCS_SCREENSHOT=1
    // (after a minute of chart).
    await a.post("/api/config", { app: "clock", config: { font: "10x20", color: [255, 160, 0] } });
    await a.post("/api/switch", { app: "clock" });
    await page.locator('#preview[data-app="clock"]').waitFor({ timeout: 3000 });
    await page.getByLabel("Topic", { exact: true }).fill("ticker");
    await page.getByRole("button", { name: "Subscribe" }).click();
    await page.locator('#inspector-log li[data-topic="ticker"][data-kind="event"]').first().waitFor({ timeout: 5000 });
    const docs = process.env.SWITCHBOARD_DOCS_SCREENSHOT === "1";
    if (docs) await eventually(async () => Number(await page.locator("#chart").getAttribute("data-samples")) >= 30, 90000, "a minute of chart");
    await page.screenshot({ path: path.join(OUT, "dashboard-live.png"), fullPage: true });
    if (docs) await page.screenshot({ path: path.join(ROOT, "docs/dashboard.png"), fullPage: true });
    const allowed = [a.addr, b.addr];
    const foreign = record.requests.filter((u) => !allowed.some((addr) => u.startsWith(`http://${addr}/`) || u.startsWith(`ws://${addr}/`)));
    assert.deepEqual(foreign, []);
    assert.deepEqual(record.failures, []);
    assert.deepEqual(record.badResponses, []);
    assert.deepEqual(record.console, [], "no console errors");
  }),
);

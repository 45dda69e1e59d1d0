// A close the page starts is answered with the server's Close frame, seen
// by Debian's headless Chromium (playwright-core): `CloseEvent.wasClean`
// is true and `code` is 1000 on every WebSocket a node terminates — native
// /ws and /ws/{topic}, our Engine.IO websocket transport, a
// socket upgraded from long-polling, and the proxy's client leg. (Without
// the server's Close, Chromium reports wasClean false and code 1006.)

import test from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { requireTool, scoped } from "../../clients/js/test/harness.mjs";

const { chromium } = requireTool("playwright-core");
const { WebSocketServer } = requireTool("ws");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Runs in the page: opens `url`, runs the named setup, closes with `code`, resolves with the CloseEvent. */
function closeInPage({ url, setup, code }) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const frames = [];
    let waiter = null;
    ws.onmessage = (m) => {
      frames.push(String(m.data));
      if (waiter) waiter();
    };
    const next = async () => {
      while (frames.length === 0) await new Promise((r) => (waiter = r));
      return frames.shift();
    };
    const acked = async () => {
      ws.send('421["subscribe","news"]');
      while (!(await next()).startsWith("431"));
    };
    const setups = {
      first: async () => {
        await next();
      },
      engineio: async () => {
        if (!(await next()).startsWith("0{")) throw new Error("no OPEN");
        ws.send("40");
        while (!(await next()).startsWith("40"));
        await acked();
      },
      upgraded: async () => {
        ws.send("2probe");
        if ((await next()) !== "3probe") throw new Error("no 3probe");
        ws.send("5");
        await acked();
      },
      proxy: async () => {
        if (JSON.parse(await next()).type !== "proxy_connected") throw new Error("no proxy_connected");
        ws.send("echo me");
        if ((await next()) !== "echo me") throw new Error("no echo");
      },
    };
    ws.onerror = () => {};
    ws.onopen = async () => {
      try {
        await setups[setup]();
      } catch (e) {
        reject(e);
        return;
      }
      const started = performance.now();
      ws.onclose = (e) => resolve({ code: e.code, wasClean: e.wasClean, ms: Math.round(performance.now() - started) });
      if (code === null) ws.close();
      else ws.close(code);
    };
  });
}

test(
  "Chromium: every close the page starts ends clean with the server's Close",
  scoped(async (s) => {
    const upstream = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    upstream.on("connection", (ws) => ws.on("message", (data, binary) => ws.send(data, { binary })));
    await new Promise((r) => upstream.once("listening", r));
    s.defer(() => new Promise((r) => upstream.close(r)));
    const node = await s.node("close-browser", {
      WEBSOCKET_PROXY_ENABLED: "true",
      WEBSOCKET_PROXY_ROUTES: `echo:ws://127.0.0.1:${upstream.address().port}/`,
    });
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
    await page.goto(`${node.http}/healthz`);
    const ws = node.http.replace("http", "ws");

    const check = async (what, url, setup, code = 1000, expect = 1000) => {
      const got = await page.evaluate(closeInPage, { url, setup, code });
      console.log(`${what}: sent ${code ?? "no code"}, CloseEvent`, got);
      assert.equal(got.wasClean, true, `${what}: wasClean`);
      assert.equal(got.code, expect, `${what}: code`);
    };
    await check("/ws", `${ws}/ws`, "first");
    await check("/ws/{topic}", `${ws}/ws/news`, "first");
    await check("/ws, another code", `${ws}/ws`, "first", 4321, 4321);
    await check("/ws, close() without a code", `${ws}/ws`, "first", null, 1005);
    await check("Engine.IO websocket transport", `${ws}/socket.io/?EIO=4&transport=websocket`, "engineio");

    // A long-polling session (made by the page) upgraded to websocket.
    const sid = await page.evaluate(async () => {
      const poll = "/socket.io/?EIO=4&transport=polling";
      const { sid } = JSON.parse((await (await fetch(poll)).text()).slice(1));
      await fetch(`${poll}&sid=${sid}`, { method: "POST", body: "40" });
      const connected = await (await fetch(`${poll}&sid=${sid}`)).text();
      if (!connected.includes("40{")) throw new Error(`no CONNECT: ${connected}`);
      return sid;
    });
    await check("Engine.IO, upgraded from polling", `${ws}/socket.io/?EIO=4&transport=websocket&sid=${sid}`, "upgraded");

    await check("proxy client leg", `${ws}/ws/proxy/echo`, "proxy");
  }),
);

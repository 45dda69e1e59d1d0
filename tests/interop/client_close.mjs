// Closes started by the client are answered with the server's Close frame,
// seen by Node's `ws` package.
// usage: node client_close.mjs <httpBase> <proxyRoute>
// For each WebSocket the node terminates (native /ws and /ws/{topic}, our
// Engine.IO websocket transport, a socket upgraded from
// long-polling, the proxy's client leg) a `ws` client opens it, waits until
// the server has spoken, calls close(1000) and expects its "close" event
// with code 1000 (`ws` reports 1006 when no Close frame came back). On /ws
// an empty Close (close() without a code) must be answered too: `ws` then
// reports 1005 ("no status"), not 1006. Prints OK when all held.
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const WebSocket = require("ws");

const [base, route] = process.argv.slice(2);
const wsBase = base.replace(/^http/, "ws");
const fail = (msg) => {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

/**
 * Opens `url`, runs `setup(ws, next)` (next() resolves with the next text
 * frame), closes with `code` (null: an empty Close) and expects `expect`.
 */
async function closeAndCheck(url, setup, code = 1000, expect = 1000) {
  const ws = new WebSocket(url);
  const frames = [];
  let waiter = null;
  ws.on("message", (data) => {
    frames.push(data.toString());
    if (waiter) waiter();
  });
  const next = async () => {
    while (frames.length === 0) await new Promise((r) => (waiter = r));
    return frames.shift();
  };
  await new Promise((resolve, reject) => {
    ws.once("open", resolve);
    ws.once("error", reject);
  });
  await setup(ws, next);
  const started = Date.now();
  const closed = new Promise((resolve) => ws.once("close", (c, reason) => resolve([c, reason.toString()])));
  if (code === null) ws.close();
  else ws.close(code);
  const [got] = await closed;
  const took = Date.now() - started;
  if (got !== expect) fail(`${url}: close code ${got}, expected ${expect}`);
  if (took > 4000) fail(`${url}: the close took ${took} ms (no TCP close from the server?)`);
  console.log(`${url}: sent ${code ?? "an empty Close"}, close event ${got} after ${took} ms`);
}

const firstFrame = async (_ws, next) => {
  await next();
};
async function acked(ws, next) {
  ws.send('421["subscribe","news"]');
  while (!(await next()).startsWith("431"));
}

await closeAndCheck(`${wsBase}/ws`, firstFrame);
await closeAndCheck(`${wsBase}/ws/news`, firstFrame);
await closeAndCheck(`${wsBase}/ws`, firstFrame, null, 1005);

await closeAndCheck(`${wsBase}/socket.io/?EIO=4&transport=websocket`, async (ws, next) => {
  if (!(await next()).startsWith("0{")) fail("no Engine.IO OPEN");
  ws.send("40");
  while (!(await next()).startsWith("40"));
  await acked(ws, next);
});

// A long-polling session upgraded to websocket.
const poll = `${base}/socket.io/?EIO=4&transport=polling`;
const { sid } = JSON.parse((await (await fetch(poll)).text()).slice(1));
await fetch(`${poll}&sid=${sid}`, { method: "POST", body: "40" });
if (!(await (await fetch(`${poll}&sid=${sid}`)).text()).includes("40{")) fail("no polling CONNECT");
await closeAndCheck(`${wsBase}/socket.io/?EIO=4&transport=websocket&sid=${sid}`, async (ws, next) => {
  ws.send("2probe");
  if ((await next()) !== "3probe") fail("no 3probe");
  ws.send("5");
  await acked(ws, next);
});

await closeAndCheck(`${wsBase}/ws/proxy/${route}`, async (ws, next) => {
  if (JSON.parse(await next()).type !== "proxy_connected") fail("no proxy_connected");
  ws.send("echo me");
  if ((await next()) !== "echo me") fail("no echo");
});
console.log("OK");

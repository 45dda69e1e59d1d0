// socket.io-client against nodes whose hooks point at the Flask example
// back end (examples/flask-backend/app.py).
//
// usage: node hooks_sio.mjs scenario <url> <alice-cookie> <mallory-cookie> <carol-cookie> <polling|websocket>
//        node hooks_sio.mjs load <urlA> <urlB> <cookie>
// `scenario`: the connect hook admits and refuses, the subscribe hook
// decides on room.*, the publish hook replaces chat.* data, events with an
// ack are RPCs. `load`: 50 sockets over both nodes (both transports) emit 4
// RPCs each at once; every ack must answer its own emit.
// Exits 0 and prints OK when every step held.
import { createRequire } from "node:module";
import { isDeepStrictEqual } from "node:util";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { io } = require("socket.io-client");

const [mode, ...args] = process.argv.slice(2);
const tag = `[js ${mode} ${mode === "scenario" ? args[4] : ""}]`;
const log = (...a) => console.log(tag, ...a);
const fail = (msg) => {
  console.error(`${tag} FAIL: ${msg}`);
  process.exit(1);
};
const assert = (cond, msg) => cond || fail(msg);
const same = isDeepStrictEqual;
setTimeout(() => fail("timed out"), 90000).unref();

function open(url, transport, { cookie, auth } = {}) {
  const socket = io(url, {
    transports: [transport],
    upgrade: false,
    reconnection: false,
    timeout: 10000,
    extraHeaders: cookie ? { Cookie: cookie } : {},
    auth,
  });
  socket.seen = [];
  socket.onAny((event, data) => socket.seen.push({ event, data }));
  return new Promise((resolve, reject) => {
    socket.on("connect", () => resolve(socket));
    socket.on("connect_error", (err) => reject(err));
  });
}

async function waitFor(socket, pred, what, ms = 5000) {
  const start = Date.now();
  for (;;) {
    const hit = socket.seen.find(pred);
    if (hit) return hit.data;
    if (Date.now() - start > ms) fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const call = (socket, event, data) => socket.timeout(10000).emitWithAck(event, data);

async function scenario(url, alice, mallory, carol, transport) {
  for (const [cookie, expected] of [
    [undefined, "not signed in: sign in at /login first"],
    [mallory, "mallory is banned"],
  ]) {
    try {
      const s = await open(url, transport, { cookie });
      s.close();
      fail(`admitted, expected a refusal with ${expected}`);
    } catch (err) {
      assert(err.message === expected, `connect_error ${err.message}, expected ${expected}`);
      log("refused:", err.message);
    }
  }
  const connectData = { device: "node", n: [1, 2] };
  const a = await open(url, transport, { cookie: alice, auth: { data: connectData } });
  const who = await call(a, "whoami", null);
  assert(who.user === "alice" && who.client === a.id && who.transport === "socketio", JSON.stringify(who));
  assert(same(who.info, { name: "Alice", connectData }), JSON.stringify(who.info));
  log("admitted as alice with the back end's info; client id = sid", a.id);

  let ack = await call(a, "subscribe", "room.1");
  assert(ack.ok === true, JSON.stringify(ack));
  ack = await call(a, "subscribe", "room.2");
  assert(same(ack, { ok: false, error: "alice is not a member of room.2", topic: "room.2" }), JSON.stringify(ack));
  ack = await call(a, "subscribe", { topic: "room.2", data: { invite: "sesame" } });
  assert(ack.ok === true, JSON.stringify(ack));
  log("subscribe hook: room.1 allowed, room.2 refused with its message, allowed with data");

  const result = await call(a, "your_action", { x: 1 });
  assert(result.type === "action_result" && same(result.data.echo, { x: 1 }) && result.data.client === a.id, JSON.stringify(result));
  const failed = await call(a, "nope", {});
  assert(same(failed, { ok: false, code: "rpc_failed", error: "unknown method nope" }), JSON.stringify(failed));
  a.emit("nope_without_ack", { z: 3 });
  const err = await waitFor(a, (s) => s.event === "error" && s.data?.event === "nope_without_ack", "error event");
  assert(err.code === "rpc_failed", JSON.stringify(err));
  log("RPCs: your_action acked with action_result data; failures ack {ok: false} and emit error");

  const c = await open(url, transport, { cookie: carol });
  for (const s of [a, c]) assert((await call(s, "subscribe", "chat.js")).ok === true, "subscribe chat.js");
  ack = await call(c, "publish", { topic: "chat.js", data: { text: "SPAM" } });
  assert(ack.ok === false && ack.error === "no spam, please", JSON.stringify(ack));
  ack = await call(c, "publish", { topic: "chat.js", data: { text: "hi", x: 1 } });
  assert(ack.ok === true, JSON.stringify(ack));
  for (const s of [a, c]) {
    const data = await waitFor(s, (e) => e.event === "chat.js", "the chat publication");
    assert(same(data, { from: "carol", text: "hi" }), JSON.stringify(data));
  }
  log("publish hook: spam refused, the replacement data reached both subscribers");
  a.close();
  c.close();
}

async function load(urlA, urlB, cookie) {
  const sockets = await Promise.all(
    Array.from({ length: 50 }, (_, i) =>
      open(i % 2 ? urlB : urlA, i % 4 < 2 ? "websocket" : "polling", { cookie }),
    ),
  );
  const calls = [];
  sockets.forEach((s, i) => {
    for (let j = 0; j < 4; j++) {
      const marker = `${i}/${j}`;
      calls.push(
        call(s, "your_action", { marker }).then((r) => {
          assert(r.type === "action_result", `socket ${i}: ${JSON.stringify(r)}`);
          assert(r.data.echo.marker === marker, `socket ${i} call ${j} got ${JSON.stringify(r.data.echo)}`);
          assert(r.data.client === s.id, `socket ${i} got ${r.data.client}'s answer`);
        }),
      );
    }
  });
  await Promise.all(calls);
  log(`${calls.length} RPCs from ${sockets.length} sockets over 2 nodes, each acked with its own answer`);
  for (const s of sockets) s.close();
}

try {
  if (mode === "scenario") await scenario(...args);
  else if (mode === "load") await load(...args);
  else fail(`unknown mode ${mode}`);
  log("OK");
  process.exit(0);
} catch (err) {
  fail(err?.stack ?? String(err));
}

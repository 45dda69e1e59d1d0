// Node's @socket.io/redis-emitter, unchanged, for tests/compat.rs (its
// README's setup: node-redis 4 and `new Emitter(redisClient)`).
// usage:
//   node compat_emitter.mjs <redisUrl> <key> steps '<json list>'
//       each step: ["emit", event, data, {"rooms"?: [...], "except"?: [...]}],
//                  ["emit_args", event, [args...], {...}] (several arguments),
//                  ["emit_date", event, iso, {...}] (data {at: new Date(iso)}),
//                  ["socketsJoin", [sids], [rooms]], ["socketsLeave", [sids], [rooms]],
//                  ["sleep", ms]
//   node compat_emitter.mjs <redisUrl> <key> load <room> <count> <rate>
// Prints OK at the end.
import { createRequire } from "node:module";
const require = createRequire(process.env.SWITCHBOARD_TOOLS + "/node/package.json");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

const [url, key, mode, ...rest] = process.argv.slice(2);
const redisClient = createClient({ url });
await redisClient.connect();
const emitter = new Emitter(redisClient, { key });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

if (mode === "steps") {
  for (const step of JSON.parse(rest[0])) {
    if (step[0] === "emit" || step[0] === "emit_args") {
      const [, event, data, opts] = step;
      let op = emitter;
      for (const r of opts.rooms ?? []) op = op.to(r);
      for (const e of opts.except ?? []) op = op.except(e);
      if (step[0] === "emit") op.emit(event, data);
      else op.emit(event, ...data);
    } else if (step[0] === "emit_date") {
      const [, event, iso, opts] = step;
      let op = emitter;
      for (const r of opts.rooms ?? []) op = op.to(r);
      op.emit(event, { at: new Date(iso) });
    } else if (step[0] === "socketsJoin" || step[0] === "socketsLeave") {
      emitter.in(step[1])[step[0]](step[2]);
    } else if (step[0] === "sleep") {
      await sleep(step[1]);
    }
  }
} else {
  const [room, count, rate] = [rest[0], Number(rest[1]), Number(rest[2])];
  const start = Date.now();
  for (let i = 0; i < count; i++) {
    const delay = start + (i * 1000) / rate - Date.now();
    if (delay > 0) await sleep(delay);
    emitter.to(room).emit("tick", { seq: i });
  }
  console.log(`sent ${count} in ${(Date.now() - start) / 1000} s`);
}
await redisClient.quit();
console.log("OK");

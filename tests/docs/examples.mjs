// Runs the examples of the documentation against real nodes, so that a doc
// whose example no longer does what it says fails ./scripts/test.
//
// THE CONVENTION (also in docs/contributing.md, "Examples that run")
//
// Fenced code blocks carry a marker after their language:
//
//   ```sh run                 the harness runs the block (sh/bash/console:
//   curl -s localhost:8080/…  bash -e; js/mjs: an ES module on Node's stdin;
//   ```                       python/py: the tools venv's python)
//   ```json expect            the output (stdout) the block just above must
//   {"status":"ok",…}         print; `…` matches anything within a line, a
//   ```                       line of only `…` any number of lines
//   ```js no-run: why         never run; the reason is required (a browser
//   …                         page, a Helm install, a Redis Cluster, …)
//   ```
//
// In a checked doc (DOCS below) every block in a language the harness can run
// (sh, bash, shell, console, js, javascript, mjs, ts, python, py) must be
// `run` or `no-run: why`; other blocks (json, text, yaml, none) are samples
// and are left alone unless marked `expect`.
//
// Attributes after `run`: `timeout=SECONDS` (default 20); `browser` (a js
// block written for browsers: it gets `WebSocket` as a global, the `ws`
// package's, which Node 20 lacks).
//
// A `run` block passes when its output matches its `expect` block (checked as
// output arrives: once it matches, the block's process is stopped, so an
// example that subscribes forever passes as soon as it printed what the doc
// says), or, without an `expect` block, when it exits 0. Both within the
// timeout.
//
// What the blocks talk to is set up by directives, HTML comments (invisible
// on GitHub) on a line of their own, which apply to the blocks below them:
//
//   <!-- examples: redis 127.0.0.1:6390 -->
//       starts this doc's private redis-server on a free port; wherever the
//       blocks (and later directives) say `127.0.0.1:6390`, `localhost:6390`
//       or `-p 6390`, they get that private server. Never the real 6379: a
//       bare `redis-cli` (no -p, -u or -h) is refused.
//   <!-- examples: node localhost:8080 [ALIAS...] [NAME=value...] -->
//       (re)starts this doc's switchboard node with those settings on top of
//       the binary's defaults (demo events on, as `cargo run`), HOST=127.0.0.1
//       and a free PORT. Every ALIAS is an address the blocks use for it:
//       `localhost:8080` stands for 127.0.0.1:<port>; an alias with a scheme
//       (`wss://switchboard.example.com`) for ws://127.0.0.1:<port>
//       (`https://…`: http://…). Values go through the same rewriting, so
//       REDIS_URL=redis://127.0.0.1:6390 names the private Redis.
//
// The blocks of one doc run in order, like one terminal session: it starts in
// `switchboard/` of a sandbox, a directory of links to this checkout's entries
// (so `../x` stays in the sandbox; `target/` is left out: examples do not
// build), the working directory carries over from block to block (a
// `cd` moves the session; shell variables do not carry over), and module
// resolution finds the doc's own installs (`npm install …` in a block) and
// then the packages of $SWITCHBOARD_TOOLS/node (ws, socket.io-client, redis).
// Addresses in the output are written back as the doc's aliases.

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync, readdirSync, chmodSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { ROOT, TOOLS, startNode, startRedis } from "../../clients/js/test/harness.mjs";

/** Languages the harness runs, by interpreter. */
const RUNNABLE = {
  sh: "bash",
  bash: "bash",
  shell: "bash",
  console: "bash",
  js: "node",
  javascript: "node",
  mjs: "node",
  ts: "node",
  python: "python",
  py: "python",
};

// === parsing ===

/**
 * The steps of a Markdown document: `{kind: "block", lang, marker, attrs,
 * reason, code, line}` and `{kind: "directive", words, line}`, plus the
 * problems found (unmarked blocks, a stray `expect`, …).
 */
export function parse(markdown, file = "doc") {
  const lines = markdown.split("\n");
  const steps = [];
  const problems = [];
  for (let i = 0; i < lines.length; i++) {
    const directive = /^<!--\s*examples:\s*(.*?)\s*-->\s*$/.exec(lines[i]);
    if (directive) {
      steps.push({ kind: "directive", words: directive[1].split(/\s+/).filter(Boolean), line: i + 1 });
      continue;
    }
    const open = /^(\s*)(`{3,}|~{3,})(.*)$/.exec(lines[i]);
    if (!open) continue;
    const [, indent, fence, info] = open;
    const start = i;
    const body = [];
    for (i++; i < lines.length; i++) {
      if (lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, "") === "") break;
      body.push(lines[i].startsWith(indent) ? lines[i].slice(indent.length) : lines[i]);
    }
    const [lang = "", ...rest] = info.trim().split(/\s+/);
    const tail = info.trim().slice(lang.length).trim();
    const block = { kind: "block", lang: lang.toLowerCase(), marker: null, attrs: {}, reason: null, code: body.join("\n"), line: start + 1 };
    if (rest[0] === "run") {
      block.marker = "run";
      for (const a of rest.slice(1)) {
        const [k, v] = a.split("=");
        block.attrs[k] = v ?? true;
      }
    } else if (rest[0] === "expect") {
      block.marker = "expect";
    } else if (/^no-run:/.test(tail)) {
      block.marker = "no-run";
      block.reason = tail.slice("no-run:".length).trim();
      if (!block.reason) problems.push(`${file}:${block.line}: \`no-run:\` needs a reason`);
    } else if (rest.length) {
      problems.push(`${file}:${block.line}: unknown marker "${rest.join(" ")}" (run, expect or no-run: why)`);
    }
    if (RUNNABLE[block.lang] && !block.marker) {
      problems.push(`${file}:${block.line}: a \`${block.lang}\` block must be marked \`run\` or \`no-run: why\``);
    }
    if (block.marker === "run" && !RUNNABLE[block.lang]) {
      problems.push(`${file}:${block.line}: cannot run a \`${block.lang || "plain"}\` block`);
    }
    if (block.marker === "expect") {
      const prev = steps.at(-1);
      if (!prev || prev.kind !== "block" || prev.marker !== "run" || prev.expect) {
        problems.push(`${file}:${block.line}: an \`expect\` block must follow a \`run\` block`);
      } else {
        prev.expect = block;
        continue;
      }
    }
    steps.push(block);
  }
  return { steps, problems };
}

// === matching ===

const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Whether `actual` (lines) matches `expected` (lines with `…` wildcards). */
export function matches(expected, actual) {
  const pats = trimBlank(expected.map((l) => l.trimEnd()));
  const got = trimBlank(actual.map((l) => l.trimEnd()));
  const line = pats.map((p) => (p.trim() === "…" ? null : new RegExp(`^${p.split("…").map(escape).join(".*?")}$`)));
  // Classic glob matching over lines; `null` = any number of lines.
  const memo = new Map();
  const go = (i, j) => {
    const key = i * 100003 + j;
    if (memo.has(key)) return memo.get(key);
    let r;
    if (i === line.length) r = j === got.length;
    else if (line[i] === null) r = go(i + 1, j) || (j < got.length && go(i, j + 1));
    else r = j < got.length && line[i].test(got[j]) && go(i + 1, j + 1);
    memo.set(key, r);
    return r;
  };
  return go(0, 0);
}

function trimBlank(lines) {
  let a = 0;
  let b = lines.length;
  while (a < b && lines[a] === "") a++;
  while (b > a && lines[b - 1] === "") b--;
  return lines.slice(a, b);
}

// === running ===

/** A doc's session: sandbox, working directory, node, redis, address rewrites. */
export class Session {
  constructor(name) {
    this.name = name;
    this.root = mkdtempSync(path.join(tmpdir(), "sb-docs-"));
    // The checkout, as a directory of links to its entries (not one link to
    // it: `mkdir ../x` would then make x beside the real checkout).
    this.cwd = path.join(this.root, "switchboard");
    mkdirSync(this.cwd);
    for (const entry of readdirSync(ROOT)) {
      if (entry !== "target" && entry !== ".git") symlinkSync(path.join(ROOT, entry), path.join(this.cwd, entry));
    }
    // Packages every example may import, found after the doc's own installs.
    const modules = path.join(this.root, "node_modules");
    mkdirSync(modules);
    const tools = path.join(TOOLS, "node", "node_modules");
    for (const pkg of existsSync(tools) ? readdirSync(tools) : []) {
      if (!pkg.startsWith(".")) symlinkSync(path.join(tools, pkg), path.join(modules, pkg));
    }
    // A redis-cli that refuses to guess its server (never the real 6379).
    this.bin = path.join(this.root, ".bin");
    mkdirSync(this.bin);
    const real = process.env.REDIS_CLI ?? "redis-cli";
    writeFileSync(
      path.join(this.bin, "redis-cli"),
      `#!/usr/bin/env bash
for a in "$@"; do case "$a" in -p|-u|-h|-p*|-u*|-h*) exec "$(PATH=${JSON.stringify(process.env.PATH)} command -v ${real})" "$@";; esac; done
echo "doc examples must name their Redis (-p, -u or -h): a bare redis-cli would use the real :6379" >&2; exit 2
`,
    );
    chmodSync(path.join(this.bin, "redis-cli"), 0o755);
    // Bare imports the block's own directories cannot resolve are looked up
    // in the sandbox's node_modules (the tools), wherever the session is.
    writeFileSync(
      path.join(this.root, ".fallback.mjs"),
      `import { register } from "node:module";
register(${JSON.stringify(`data:text/javascript,${encodeURIComponent(`
export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context);
  } catch (err) {
    if (err?.code !== "ERR_MODULE_NOT_FOUND" || /^[./]|^[a-z]+:/i.test(specifier)) throw err;
    return next(specifier, { ...context, parentURL: ${JSON.stringify(`file://${this.root}/`)} });
  }
}`)}`)});
`,
    );
    writeFileSync(
      path.join(this.root, ".browser-globals.mjs"),
      `import { createRequire } from "node:module";
const require = createRequire(${JSON.stringify(path.join(TOOLS, "node", "package.json"))});
globalThis.WebSocket ??= require("ws");
`,
    );
    this.rewrites = []; // [from, to]
    this.back = []; // [real, alias] for output
    this.node = null;
    this.redis = null;
    this.log = [];
  }

  rewrite(text) {
    let out = text;
    for (const [from, to] of this.rewrites) out = out.split(from).join(to);
    return out;
  }

  async directive(words, line) {
    const [what, ...rest] = words;
    if (what === "redis") {
      const alias = rest[0];
      const m = /^(.*):(\d+)$/.exec(alias ?? "");
      if (!m) throw new Error(`line ${line}: "examples: redis HOST:PORT"`);
      this.redis?.stop();
      this.redis = await startRedis();
      const [, , port] = m;
      const real = `127.0.0.1:${this.redis.port}`;
      this.rewrites = this.rewrites.filter(([, , tag]) => tag !== "redis");
      for (const from of [`127.0.0.1:${port}`, `localhost:${port}`]) this.rewrites.push([from, real, "redis"]);
      this.rewrites.push([`-p ${port}`, `-p ${this.redis.port}`, "redis"]);
      this.back.push([real, alias]);
      return;
    }
    if (what === "node") {
      const aliases = rest.filter((w) => !/^[A-Z][A-Z0-9_]*=/.test(w));
      const env = { WEBSOCKET_MOCK_EVENTS: null };
      for (const w of rest.filter((w) => /^[A-Z][A-Z0-9_]*=/.test(w))) {
        const i = w.indexOf("=");
        env[w.slice(0, i)] = this.rewrite(w.slice(i + 1));
      }
      if (this.node) await this.node.stop("SIGTERM");
      this.node = await startNode(`docs-${this.name}`, env);
      this.rewrites = this.rewrites.filter(([, , tag]) => tag !== "node");
      const real = `127.0.0.1:${this.node.port}`;
      // Longer aliases first, so that `wss://host` wins over `host`.
      for (const alias of [...aliases].sort((a, b) => b.length - a.length)) {
        const scheme = /^(\w+):\/\//.exec(alias);
        if (scheme) {
          const plain = { wss: "ws", https: "http" }[scheme[1]] ?? scheme[1];
          this.rewrites.push([alias, `${plain}://${real}`, "node"]);
        } else {
          this.rewrites.push([alias, real, "node"]);
        }
      }
      this.back.push([real, aliases.find((a) => !a.includes("://")) ?? aliases[0]]);
      return;
    }
    throw new Error(`line ${line}: unknown directive "examples: ${words.join(" ")}"`);
  }

  /** Runs one `run` block; resolves with null when it passed, else a description of the failure. */
  run(block) {
    const code = this.rewrite(block.code);
    const timeout = Number(block.attrs.timeout ?? 20) * 1000;
    const cwdFile = path.join(this.root, ".cwd");
    const env = {
      ...process.env,
      PATH: `${this.bin}:${process.env.PATH}`,
      PWD: this.cwd,
      SWITCHBOARD_TOOLS: TOOLS,
      // Installs come from npm's cache when it has them.
      npm_config_prefer_offline: "true",
      npm_config_update_notifier: "false",
      npm_config_fund: "false",
      npm_config_audit: "false",
    };
    let cmd;
    let args;
    let input = code;
    const interp = RUNNABLE[block.lang];
    if (interp === "bash") {
      cmd = "bash";
      args = ["-e", "-o", "pipefail", "-c", `trap 'pwd > ${JSON.stringify(cwdFile)}' EXIT\n${code}`];
      input = "";
    } else if (interp === "node") {
      cmd = process.execPath;
      args = ["--import", path.join(this.root, ".fallback.mjs"), "--input-type=module"];
      if (block.attrs.browser) args.unshift("--import", path.join(this.root, ".browser-globals.mjs"));
    } else {
      cmd = path.join(TOOLS, "venv", "bin", "python");
      args = ["-"];
    }
    return new Promise((resolve) => {
      const child = spawn(cmd, args, { cwd: this.cwd, env, stdio: ["pipe", "pipe", "pipe"], detached: true });
      let stdout = "";
      let stderr = "";
      let done = false;
      const finish = (failure) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          /* gone */
        }
        if (interp === "bash" && existsSync(cwdFile)) {
          const next = readFileSync(cwdFile, "utf8").trim();
          rmSync(cwdFile);
          if (next) this.cwd = next;
        }
        resolve(failure);
      };
      const shown = () => this.unrewrite(stdout);
      // While it runs, only whole lines count (a pattern ending in `…` must
      // not match half a line).
      const check = (all) => {
        const text = all ? shown() : shown().slice(0, shown().lastIndexOf("\n") + 1);
        if (block.expect && matches(block.expect.code.split("\n"), text.split("\n"))) finish(null);
      };
      const timer = setTimeout(
        () => finish({ why: `no ${block.expect ? "matching output" : "exit"} within ${timeout / 1000} s`, stdout: shown(), stderr }),
        timeout,
      );
      child.stdout.on("data", (d) => {
        stdout += d;
        check(false);
      });
      child.stderr.on("data", (d) => {
        stderr += d;
      });
      child.on("close", (status) => {
        if (done) return;
        check(true);
        if (done) return;
        if (block.expect) finish({ why: `exited with ${status}, output does not match`, stdout: shown(), stderr });
        else if (status !== 0) finish({ why: `exited with ${status}`, stdout: shown(), stderr });
        else finish(null);
      });
      child.stdin.on("error", () => {});
      child.stdin.end(input);
    });
  }

  unrewrite(text) {
    let out = text;
    for (const [real, alias] of this.back) out = out.split(real).join(alias);
    return out;
  }

  async close() {
    if (this.node) await this.node.stop("SIGKILL");
    this.redis?.stop();
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** Parses `file` and runs its examples; returns the problems (empty: all passed). */
export async function check(file, { onBlock } = {}) {
  const text = readFileSync(path.join(ROOT, file), "utf8");
  const { steps, problems } = parse(text, file);
  if (problems.length) return problems;
  const session = new Session(path.basename(file, ".md").toLowerCase());
  const failures = [];
  try {
    for (const step of steps) {
      if (step.kind === "directive") {
        await session.directive(step.words, step.line);
        continue;
      }
      if (step.marker !== "run") continue;
      const failure = await session.run(step);
      onBlock?.(step, failure);
      if (failure) {
        failures.push(
          [
            `${file}:${step.line}: ${failure.why}`,
            "--- block ---",
            step.code,
            ...(step.expect ? ["--- expected ---", step.expect.code] : []),
            "--- got (stdout) ---",
            failure.stdout,
            "--- stderr ---",
            failure.stderr,
          ].join("\n"),
        );
        // Later blocks build on this one: stop at the first failure.
        break;
      }
    }
  } catch (err) {
    failures.push(`${file}: ${err.stack ?? err}`);
  } finally {
    if (failures.length && session.node) failures.push(`--- node log ---\n${session.node.log}`);
    await session.close();
  }
  return failures;
}

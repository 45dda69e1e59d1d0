// The reference tables cannot drift from the code:
//
// - every setting of the binary (config::names::ALL, read from
//   `switchboard --help`, which prints each with its built-in default) has a
//   row in README's settings table, a key in the Helm chart's values.yaml
//   (`config:` or `secrets:`) and values.schema.json, and an entry in
//   docker-compose.yml's node environment;
// - where README names a default, it is the binary's; where values.yaml or
//   docker-compose.yml set another value than the binary's default, the
//   comment right above the key says so and why, with the tag
//   `binary default: X` (X: the binary's default, `unset` when it has none),
//   so that a changed default makes this test point at every place to
//   review;
// - every metric name of src/metrics.rs is in docs/operations.md's metrics
//   table, and every close reason in its `switchboard_connections_closed_total`
//   row.
//
// A setting that deliberately has no place somewhere goes into EXCEPTIONS
// below, with the reason; an exception that is no longer needed fails too.

import test from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { isDeepStrictEqual } from "node:util";

import { BIN, ROOT, requireTool } from "../../clients/js/test/harness.mjs";

const YAML = requireTool("yaml");
const read = (f) => readFileSync(path.join(ROOT, f), "utf8");

/**
 * Settings that deliberately have no entry in one place: [setting, place,
 * why]. Places: "readme", "helm" (values.yaml), "schema", "compose".
 * Reviewed: add one only with a reason a reviewer can check.
 */
export const EXCEPTIONS = [
  ["NODE_ID", "helm", "each pod gets its own pod name through the downward API (templates/deployment.yaml)"],
  ["NODE_ID", "schema", "not a value of the chart (see helm)"],
  ["REDIS_URL", "helm", "built by the chart from redis.* or externalRedis.* and passed from its Secret, never a plain value (templates/_helpers.tpl, deployment.yaml)"],
  ["REDIS_URL", "schema", "not a value of the chart (see helm)"],
];

/** `switchboard --help`: name → default ("(unset)", "(empty)" or the value). */
function binarySettings() {
  let help;
  try {
    help = execFileSync(BIN, ["--help"], { encoding: "utf8" });
  } catch (err) {
    throw new Error(`cannot run ${BIN} --help (cargo build first, or set SWITCHBOARD_BIN): ${err.message}`);
  }
  const settings = new Map();
  const lines = help.split("\n");
  const start = lines.findIndex((l) => l.startsWith("settings and their defaults"));
  assert.ok(start >= 0, `no settings list in --help:\n${help}`);
  for (const line of lines.slice(start + 1)) {
    const m = /^ {2}([A-Z][A-Z0-9_]*)\s+(.*)$/.exec(line);
    if (m) settings.set(m[1], m[2]);
  }
  assert.ok(settings.size > 20, `--help lists only ${settings.size} settings`);
  return settings;
}

/** README's settings table: name → default cell. */
function readmeTable() {
  const text = read("README.md");
  const section = text.slice(text.indexOf("## Configuration"));
  const rows = new Map();
  for (const line of section.split("\n")) {
    if (!line.startsWith("| `")) continue;
    const [names, def] = line.split("|").slice(1, 3).map((c) => c.trim());
    for (const [, name] of names.matchAll(/`([A-Z][A-Z0-9_]*)`/g)) rows.set(name, def);
  }
  return rows;
}

/** The comment right above a key of a YAML map (yaml's `commentBefore`). */
function commentOf(map, key) {
  const pair = map.items.find((p) => p.key?.value === key);
  return [pair?.key?.commentBefore, pair?.commentBefore].filter(Boolean).join("\n");
}

/** A YAML value as the binary would read it from the environment, or null for "the binary's default". */
function asSetting(value) {
  if (value === null || value === undefined || value === "") return null;
  if (Array.isArray(value)) {
    return value.every((v) => typeof v !== "object") ? value.join(",") : JSON.stringify(value);
  }
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** Whether `value` (from a YAML file, null = not set) is the binary's default `def`. */
function sameAsBinary(value, def) {
  if (value === null) return true;
  if (def === "(unset)" || def === "(empty)") return false;
  if (value === def) return true;
  try {
    return isDeepStrictEqual(JSON.parse(value), JSON.parse(def));
  } catch {
    return false;
  }
}

/** The tag a differing value's comment must carry. */
const tag = (def) => `binary default: ${def === "(unset)" || def === "(empty)" ? "unset" : def}`;

test("every setting is documented in README, the Helm values and schema, and compose; differing defaults say why", () => {
  const settings = binarySettings();
  const problems = [];
  const excepted = (name, place) => EXCEPTIONS.some(([n, p]) => n === name && p === place);
  const used = new Set();
  const need = (name, place, present, what) => {
    if (excepted(name, place)) {
      used.add(`${name}/${place}`);
      if (present) problems.push(`${name} is in ${what} now: remove its "${place}" exception`);
    } else if (!present) {
      problems.push(`${name} is missing from ${what}`);
    }
  };

  // README.
  const readme = readmeTable();
  for (const [name, def] of settings) {
    need(name, "readme", readme.has(name), "README.md's settings table");
    const cell = readme.get(name);
    if (cell === undefined || def === "(unset)" || def === "(empty)" || def.startsWith("[")) continue;
    if (!cell.includes(`\`${def}\``)) {
      problems.push(`README.md: the default of ${name} is \`${def}\` in the binary, but the table says: ${cell}`);
    }
  }
  for (const name of readme.keys()) {
    if (!settings.has(name)) problems.push(`README.md's settings table documents ${name}, which the binary does not read`);
  }

  // Helm values.yaml and its schema.
  const valuesDoc = YAML.parseDocument(read("helm/switchboard/values.yaml"));
  const values = valuesDoc.toJS();
  const schema = JSON.parse(read("helm/switchboard/values.schema.json"));
  for (const [name, def] of settings) {
    const place = name in (values.config ?? {}) ? "config" : name in (values.secrets ?? {}) ? "secrets" : null;
    need(name, "helm", place !== null, "helm/switchboard/values.yaml (config: or secrets:)");
    const inSchema = place !== null && name in (schema.properties?.[place]?.properties ?? {});
    need(name, "schema", inSchema, `helm/switchboard/values.schema.json (properties.${place ?? "config"}.properties)`);
    if (place === null) continue;
    const value = asSetting(values[place][name]);
    if (!sameAsBinary(value, def)) {
      const comment = commentOf(valuesDoc.get(place), name);
      if (!comment.includes(tag(def))) {
        problems.push(
          `helm/switchboard/values.yaml: ${place}.${name} is ${value}, the binary's default is ${def}: ` +
            `say why in the comment above it, with "${tag(def)}"`,
        );
      }
    }
  }

  // docker-compose.yml: the environment every node service shares, plus its own.
  const composeDoc = YAML.parseDocument(read("docker-compose.yml"), { merge: true });
  const compose = composeDoc.toJS({ maxAliasCount: -1 });
  const shared = composeDoc.get("x-switchboard-env");
  const node = compose.services["switchboard-1"]?.environment ?? {};
  for (const [name, def] of settings) {
    need(name, "compose", name in node, "docker-compose.yml (x-switchboard-env or the node services)");
    if (!(name in node) || name === "NODE_ID") continue;
    // ${VAR:-default} passes the shell's value through, else the default.
    const raw = node[name];
    const m = typeof raw === "string" ? /^\$\{[A-Z0-9_]+(?::?-(.*))?\}$/.exec(raw) : null;
    const value = m ? (m[1] ?? null) : asSetting(raw);
    if (!sameAsBinary(value === "" ? null : value, def)) {
      const comment = shared?.items?.some((p) => p.key?.value === name) ? commentOf(shared, name) : "";
      if (!comment.includes(tag(def))) {
        problems.push(
          `docker-compose.yml: ${name} is ${value}, the binary's default is ${def}: ` +
            `say why in the comment above it in x-switchboard-env, with "${tag(def)}"`,
        );
      }
    }
  }

  for (const [name, place] of EXCEPTIONS) {
    if (!settings.has(name)) problems.push(`EXCEPTIONS names ${name}, which the binary does not read`);
    else if (!used.has(`${name}/${place}`)) problems.push(`EXCEPTIONS: ${name}/${place} was not needed`);
  }
  assert.deepEqual(problems, []);
});

test("every metric of src/metrics.rs and every close reason is in docs/operations.md's metrics table", () => {
  const src = read("src/metrics.rs");
  const names = [...src.matchAll(/pub const [A-Z0-9_]+: &str = "(switchboard_[a-z0-9_]+)";/g)].map((m) => m[1]);
  assert.ok(names.length > 10, "metric names found in src/metrics.rs");
  const reasons = [...src.slice(src.indexOf("pub mod reason")).matchAll(/pub const [A-Z0-9_]+: &str = "([a-z_]+)";/g)]
    .map((m) => m[1])
    .slice(0, 32);
  const ops = read("docs/operations.md");
  const table = ops.slice(ops.indexOf("## Metrics"), ops.indexOf("\n## ", ops.indexOf("## Metrics") + 1));
  const rows = new Map(
    table
      .split("\n")
      .filter((l) => l.startsWith("| `switchboard_"))
      .map((l) => [/^\| `([a-z0-9_]+)`/.exec(l)[1], l]),
  );
  const problems = names.filter((n) => !rows.has(n)).map((n) => `${n} is missing from docs/operations.md's metrics table`);
  const closed = rows.get("switchboard_connections_closed_total") ?? "";
  for (const r of reasons) if (!closed.includes(`\`${r}\``)) problems.push(`close reason "${r}" is missing from the switchboard_connections_closed_total row`);
  assert.deepEqual(problems, []);
});

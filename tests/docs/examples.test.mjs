// The documentation's examples, run against real nodes and a private
// redis-server (the convention: tests/docs/examples.mjs and
// docs/contributing.md). One test per doc; a doc added to DOCS must have
// every code block marked.
//
//   node --test tests/docs/                        every doc, and the settings check
//   node --test --test-name-pattern protocol tests/docs/examples.test.mjs

import test from "node:test";
import assert from "node:assert/strict";

import { check, matches, parse } from "./examples.mjs";

/** The docs whose examples run. Every `sh`/`js`/`python` block in them is `run` or `no-run: why`. */
export const DOCS = ["README.md", "docs/client.md", "docs/protocol.md"];

test("the matcher: exact lines, `…` within a line, a `…` line for any lines", () => {
  assert.ok(matches(["a 1", "b …"], ["a 1", "b anything"]));
  assert.ok(matches(["…", "last"], ["x", "y", "last"]));
  assert.ok(matches(["first", "…"], ["first"]));
  assert.ok(matches(['{"ok":true,…}'], ['{"ok":true,"offset":3}']));
  assert.ok(!matches(['{"ok":true,…}'], ['{"ok":false,"offset":3}']));
  assert.ok(!matches(["a"], ["a", "b"]), "extra lines fail");
  assert.ok(!matches(["b", "a"], ["a", "b"]), "order counts");
  assert.ok(matches(["", "a", ""], ["a  ", ""]), "blank edges and trailing spaces do not count");
});

test("the parser: markers, expect pairing, directives, and what it refuses", () => {
  const doc = [
    "<!-- examples: node localhost:8080 -->",
    "```sh run timeout=5",
    "echo hi",
    "```",
    "",
    "```text expect",
    "hi",
    "```",
    "```js no-run: a browser page",
    "x()",
    "```",
    "```json",
    "{}",
    "```",
    "```python",
    "print(1)",
    "```",
    "```text expect",
    "orphan",
    "```",
    "```js no-run:",
    "```",
  ].join("\n");
  const { steps, problems } = parse(doc, "t.md");
  assert.deepEqual(steps[0], { kind: "directive", words: ["node", "localhost:8080"], line: 1 });
  assert.equal(steps[1].marker, "run");
  assert.equal(steps[1].attrs.timeout, "5");
  assert.equal(steps[1].expect.code, "hi");
  assert.equal(steps[2].reason, "a browser page");
  assert.deepEqual(problems, [
    "t.md:15: a `python` block must be marked `run` or `no-run: why`",
    "t.md:18: an `expect` block must follow a `run` block",
    "t.md:21: `no-run:` needs a reason",
  ]);
});

for (const doc of DOCS) {
  test(`the examples of ${doc} run and print what the doc says`, { timeout: 600_000 }, async () => {
    const failures = await check(doc, {
      onBlock: (block, failure) => console.log(`${failure ? "FAIL" : "ok  "} ${doc}:${block.line} (${block.lang})`),
    });
    if (failures.length) assert.fail(failures.join("\n\n"));
  });
}

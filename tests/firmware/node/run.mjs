// Runs a Python script on the official MicroPython WebAssembly port (32-bit) under Node.
//
//   node run.mjs [--heapsize BYTES] [--lib DIR]... SCRIPT.py [SCRIPT.py...]
//
// Several scripts run one after the other in the same interpreter (shared globals): this port's
// gc.collect() only reclaims garbage between top-level runs, so heap figures are taken in a
// later script.
// Every --lib DIR is copied recursively into the in-memory filesystem's /lib (on sys.path),
// so `import cws.envelope` finds firmware/micropython/lib/cws/. The script runs with
// runPythonAsync (this port has no asyncio.run). The port itself exits 0 after a traceback;
// this driver catches PythonError and exits 1, so a failing Python check fails the test.
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const args = process.argv.slice(2);
const libs = [];
let heapsize = 1024 * 1024;
const scripts = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--lib") libs.push(args[++i]);
  else if (args[i] === "--heapsize") heapsize = parseInt(args[++i], 10);
  else scripts.push(args[i]);
}
if (!scripts.length) {
  console.error("usage: node run.mjs [--heapsize BYTES] [--lib DIR]... SCRIPT.py [SCRIPT.py...]");
  process.exit(2);
}

const mp = await loadMicroPython({
  heapsize,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});

function ensureDir(path) {
  try { mp.FS.mkdir(path); } catch (e) { /* exists */ }
}

function copyTree(src, dst) {
  ensureDir(dst);
  for (const name of readdirSync(src)) {
    if (name === "__pycache__" || name === "node_modules") continue;
    const s = join(src, name);
    const d = dst + "/" + name;
    if (statSync(s).isDirectory()) copyTree(s, d);
    else if (name.endsWith(".py") || name.endsWith(".mpy")) mp.FS.writeFile(d, readFileSync(s));
  }
}

for (const lib of libs) copyTree(lib, "/lib");

try {
  for (const script of scripts) await mp.runPythonAsync(readFileSync(script, "utf8"));
} catch (e) {
  if (e && e.constructor && e.constructor.name === "PythonError") {
    process.stderr.write(String(e.message) + "\n");
    process.exit(1);
  }
  throw e;
}
process.exitCode = 0;  // no process.exit(): it can cut off stdout still queued for a pipe (a RESULT line over 64 KB)

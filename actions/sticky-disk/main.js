// The main step: put stickyci on PATH and mount the disk. A disk that cannot be mounted
// degrades to an empty directory with a warning: the job runs cold, it does not fail.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const {
  COMMIT_MODES, ensureStickyci, fail, flag, info, input, saveState, setOutput, stickyci, warning,
} = require("./lib");

function main() {
  const key = input("key");
  const rawPath = input("path");
  const commit = input("commit") || "true";
  if (!(commit in COMMIT_MODES)) {
    fail(`input commit: ${JSON.stringify(commit)} is not one of ${Object.keys(COMMIT_MODES).join(", ")}`);
  }
  if (!key !== !rawPath) fail("inputs key and path go together: give both, or neither to only install stickyci");
  const trustOwners = flag("trust-owners");
  flag("kill-holders");
  if (input("token")) process.stdout.write(`::add-mask::${input("token")}\n`);

  const where = rawPath ? path.resolve(process.env.GITHUB_WORKSPACE || process.cwd(), rawPath) : "";
  let bin;
  try {
    bin = ensureStickyci();
  } catch (err) {
    if (!key) fail(`cannot install stickyci: ${err.message}`);
    return degrade(key, where, `stickyci is not available: ${err.message}`);
  }
  saveState("stickyci", bin);
  setOutput("stickyci", bin);
  if (!key) return;

  saveState("key", key);
  saveState("path", where);
  saveState("commit", commit);
  releaseStale(bin, where);
  const args = ["disk", "mount", key, where, "--strategy", input("strategy") || "auto"];
  const mounted = stickyci(bin, trustOwners ? [...args, "--trust-owners"] : args);
  if (!mounted.ok) return degrade(key, where, mounted.error);
  const r = mounted.data;
  saveState("mounted", "true");
  setOutput("mounted", "true");
  setOutput("exists", r.fresh ? "false" : "true");
  setOutput("generation", r.generation);
  setOutput("snapshot", r.snapshot);
  setOutput("strategy", r.strategy);
  info(r.fresh
    ? `mounted new empty disk ${key} at ${where} (${r.strategy}, ${r.seconds.toFixed(3)}s)`
    : `mounted ${key} generation ${r.generation} at ${where} (${r.strategy}, ` +
      `${r.base_cached ? "base cached" : "base materialised"}, ${r.seconds.toFixed(3)}s)`);
}

// A self-hosted runner keeps its workspace between jobs: a job killed before its post step
// leaves its mount behind, which would make this path non-empty. A stale stickyci mount is
// discarded; anything else stickyci does not know is left alone (and the mount will refuse it).
function releaseStale(bin, where) {
  let entries;
  try {
    entries = fs.readdirSync(where);
  } catch {
    return; // absent: the mount creates it
  }
  if (entries.length === 0) return;
  const gone = stickyci(bin, ["disk", "unmount", where, "--kill-holders"]);
  if (gone.ok) info(`discarded a mount a previous job left at ${where}`);
}

function degrade(key, where, why) {
  let left = "is an empty directory";
  try {
    fs.mkdirSync(where, { recursive: true });
    if (fs.readdirSync(where).length > 0) left = "is left as it was (not empty)";
  } catch (err) {
    left = `could not be created (${err.message})`;
  }
  warning(`sticky disk ${key} was not mounted (${why}); ${where} ${left}, the job runs cold ` +
    "and nothing will be committed");
  setOutput("mounted", "false");
  setOutput("exists", "false");
  setOutput("generation", 0);
  setOutput("snapshot", "");
  setOutput("strategy", "");
}

main();

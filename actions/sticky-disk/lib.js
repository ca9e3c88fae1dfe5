// What main.js and post.js share: the runner's protocol (inputs, state, outputs, workflow
// commands) and running `stickyci`. The runner's protocol is small enough that no npm package
// is needed: inputs are INPUT_<NAME> variables, state and outputs are appended to the files
// named by GITHUB_STATE and GITHUB_OUTPUT, and state comes back to post as STATE_<name>.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { spawnSync } = require("node:child_process");

// The action's `commit` input → the `stickyci disk commit --mode` the post step uses.
const COMMIT_MODES = { true: "always", false: null, "on-change": "on-change", "if-missing": "if-missing" };

function input(name) {
  return (process.env[`INPUT_${name.replace(/ /g, "_").toUpperCase()}`] || "").trim();
}

function flag(name) {
  const value = input(name).toLowerCase();
  if (!["true", "false"].includes(value)) fail(`input ${name}: ${JSON.stringify(value)} is not true or false`);
  return value === "true";
}

// `name<<DELIM` … `DELIM`: a value may hold newlines, and the delimiter is random so it cannot.
function appendFileCommand(variable, name, value) {
  const file = process.env[variable];
  if (!file) throw new Error(`${variable} is not set: run this action on a GitHub Actions runner`);
  const delimiter = `ghadelimiter_${crypto.randomUUID()}`;
  fs.appendFileSync(file, `${name}<<${delimiter}\n${value}\n${delimiter}\n`);
}

const saveState = (name, value) => appendFileCommand("GITHUB_STATE", name, String(value));
const setOutput = (name, value) => appendFileCommand("GITHUB_OUTPUT", name, String(value));
const state = (name) => process.env[`STATE_${name}`] || "";

function escapeData(text) {
  return String(text).replace(/%/g, "%25").replace(/\r/g, "%0D").replace(/\n/g, "%0A");
}

const info = (text) => process.stdout.write(`${text}\n`);
const warning = (text) => process.stdout.write(`::warning::${escapeData(text)}\n`);

function fail(text) {
  process.stdout.write(`::error::${escapeData(text)}\n`);
  process.exit(1);
}

function summary(line) {
  if (process.env.GITHUB_STEP_SUMMARY) fs.appendFileSync(process.env.GITHUB_STEP_SUMMARY, `${line}\n`);
}

// The environment stickyci runs in: the store and token inputs win over the runner's own.
function stickyciEnv() {
  const env = { ...process.env };
  if (input("store")) env.STICKYCI_STORE = input("store");
  if (input("token")) env.STICKYCI_TOKEN = input("token");
  return env;
}

// Run `stickyci ARGS --json`: {ok, data} with the parsed document, or {ok: false, error} with
// the one-line error stickyci printed (its JSON error body when there is one).
function stickyci(bin, args) {
  const done = spawnSync(bin, [...args, "--json"], { env: stickyciEnv(), encoding: "utf8" });
  if (done.error) return { ok: false, error: `cannot run ${bin}: ${done.error.message}` };
  let data = null;
  try {
    data = JSON.parse(done.stdout);
  } catch {
    data = null;
  }
  if (done.status === 0 && data) return { ok: true, data };
  const said = (done.stderr || "").trim().split("\n").filter(Boolean).pop();
  return { ok: false, error: (data && data.error) || said || `${bin} exited ${done.status}` };
}

function onPath(name) {
  for (const dir of (process.env.PATH || "").split(path.delimiter)) {
    const candidate = path.join(dir || ".", name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return null;
}

// stickyci on PATH, or installed once per runner into a venv under the tool cache (keyed by
// what was installed) and put on PATH for the job's later steps. Throws if it cannot be had.
function ensureStickyci() {
  const found = onPath("stickyci");
  if (found) return found;
  const spec = input("install") || path.resolve(__dirname, "..", "..");
  const root = process.env.RUNNER_TOOL_CACHE || process.env.RUNNER_TEMP;
  if (!root) throw new Error("stickyci is not on PATH and RUNNER_TOOL_CACHE is not set");
  const id = crypto.createHash("sha256").update(spec).digest("hex").slice(0, 16);
  const venv = path.join(root, "stickyci", id);
  const bin = path.join(venv, "bin", "stickyci");
  const stamp = path.join(venv, ".installed");
  if (!fs.existsSync(stamp)) {
    info(`installing stickyci (${spec}) into ${venv}`);
    for (const [cmd, args] of [
      [input("python") || "python3", ["-m", "venv", "--clear", venv]],
      [path.join(venv, "bin", "pip"), ["install", "--quiet", "--disable-pip-version-check", spec]],
    ]) {
      const done = spawnSync(cmd, args, { stdio: ["ignore", "inherit", "pipe"], encoding: "utf8" });
      if (done.status !== 0) {
        const why = done.error ? done.error.message : (done.stderr || "").trim().split("\n").pop();
        throw new Error(`${cmd} ${args.join(" ")} failed: ${why}`);
      }
    }
    fs.writeFileSync(stamp, `${spec}\n`);
  }
  if (process.env.GITHUB_PATH) fs.appendFileSync(process.env.GITHUB_PATH, `${path.dirname(bin)}\n`);
  return bin;
}

module.exports = {
  COMMIT_MODES, ensureStickyci, fail, flag, info, input, saveState, setOutput, state, stickyci,
  summary, warning,
};

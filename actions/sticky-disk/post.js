// The post step: commit the disk if the job succeeded and the commit mode says so, else
// discard its changes. Either way the mount is gone afterwards. A commit that fails fails the
// job: a later job (a deploy reading a handoff disk) would otherwise find nothing.
"use strict";

const { COMMIT_MODES, fail, flag, info, input, setOutput, state, stickyci, summary, warning } = require("./lib");

function post() {
  const key = state("key");
  const where = state("path");
  if (!key) return; // only installed stickyci
  setOutput("committed", "false");
  setOutput("committed-generation", 0);
  if (state("mounted") !== "true") {
    info(`sticky disk ${key} was not mounted: nothing to commit`);
    return;
  }
  const bin = state("stickyci");
  const status = input("job-status") || "success";
  const mode = COMMIT_MODES[state("commit")];
  const skip = status !== "success" ? `the job ended with ${status}` : mode ? "" : "commit: false";
  if (skip) {
    const gone = stickyci(bin, ["disk", "unmount", where, "--kill-holders"]);
    if (!gone.ok) return warning(`sticky disk ${key}: could not discard the mount at ${where}: ${gone.error}`);
    info(`sticky disk ${key} not committed (${skip}); changes at ${where} discarded`);
    summary(`sticky disk \`${key}\`: not committed (${skip})`);
    return;
  }
  const args = ["disk", "commit", where, "--mode", mode];
  const done = stickyci(bin, flag("kill-holders") ? [...args, "--kill-holders"] : args);
  if (!done.ok) fail(`sticky disk ${key}: commit failed: ${done.error}`);
  const r = done.data;
  for (const holder of r.killed) info(`stopped ${holder}`);
  for (const g of r.raced_with) {
    warning(`sticky disk ${key}: raced with generation ${g.gen} by ${g.committer} (last write wins); ` +
      "give each committing job its own disk");
  }
  if (r.warning) warning(r.warning);
  if (!r.committed) {
    info(`sticky disk ${key} not committed: ${r.reason}`);
    summary(`sticky disk \`${key}\`: not committed (${r.reason})`);
    return;
  }
  setOutput("committed", "true");
  setOutput("committed-generation", r.generation);
  info(`committed ${key} generation ${r.generation}: +${r.added} -${r.removed} ~${r.modified} paths, ` +
    `${r.files} files, ${r.new_bytes} bytes new, ${r.stored_bytes} bytes stored in ${r.seconds.toFixed(2)}s`);
  summary(`sticky disk \`${key}\`: committed generation ${r.generation}`);
}

post();

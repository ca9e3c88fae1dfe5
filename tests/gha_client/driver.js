// Drives the real @actions/cache client for tests/test_server_gha.py.
//   node driver.js save KEY PATH...
//   node driver.js restore KEY [--restore-keys K1,K2] [--lookup-only] PATH...
// The environment names the service (ACTIONS_RESULTS_URL, ACTIONS_RUNTIME_TOKEN,
// ACTIONS_CACHE_SERVICE_V2). The client's own log goes to stdout as on a runner; the last
// line is "RESULT <json>": the entry id saved (-1: not saved) or the key restored (null: miss).
'use strict';
const cache = require('@actions/cache');

async function main(argv) {
  const [command, key, ...rest] = argv;
  let restoreKeys = [];
  let lookupOnly = false;
  const paths = [];
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--restore-keys') restoreKeys = rest[++i].split(',').filter(Boolean);
    else if (rest[i] === '--lookup-only') lookupOnly = true;
    else paths.push(rest[i]);
  }
  let result;
  if (command === 'save') {
    result = await cache.saveCache(paths, key);
  } else if (command === 'restore') {
    result = await cache.restoreCache(paths, key, restoreKeys, { lookupOnly }) ?? null;
  } else {
    throw new Error(`unknown command ${command}: use save or restore`);
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
}

main(process.argv.slice(2)).catch(err => {
  console.log(`RESULT ${JSON.stringify({ error: err.name, message: err.message })}`);
  process.exitCode = 1;
});

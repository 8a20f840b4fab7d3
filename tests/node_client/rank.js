// An independent reelrank client: Node's @grpc/grpc-js with the .proto loaded at run time.
//
// It shares no code with the Python server, so a test that passes through it shows the
// published contract (protos/reelrank/v1/ranker.proto) is enough to call the service.
//
// Usage: node rank.js TARGET REQUEST_JSON [DEADLINE_MS]
// Prints one JSON line: {"ok": true, "response": {...}} or {"ok": false, "code": N,
// "codeName": "...", "details": "..."}; exits 0 either way, 1 on a usage mistake.

"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

function loadRanker() {
  const definition = protoLoader.loadSync("reelrank/v1/ranker.proto", {
    includeDirs: [PROTO_ROOT],
    // Field names as in the .proto; int64 ids as decimal strings, since JavaScript numbers
    // lose precision above 2^53.
    longs: String,
    keepCase: true,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).reelrank.v1.Ranker;
}

function main(argv) {
  if (argv.length < 2) {
    process.stderr.write("usage: node rank.js TARGET REQUEST_JSON [DEADLINE_MS]\n");
    process.exit(1);
  }
  const [target, requestJson, deadlineMs = "5000"] = argv;
  const Ranker = loadRanker();
  const client = new Ranker(target, grpc.credentials.createInsecure());
  const deadline = new Date(Date.now() + Number(deadlineMs));

  client.Rank(JSON.parse(requestJson), { deadline }, (error, response) => {
    const codeNames = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
    const result = error
      ? { ok: false, code: error.code, codeName: codeNames[error.code], details: error.details }
      : { ok: true, response };
    process.stdout.write(JSON.stringify(result) + "\n");
    client.close();
  });
}

main(process.argv.slice(2));

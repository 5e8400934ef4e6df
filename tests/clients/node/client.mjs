// A tenant's program in another language: a Node.js client of aidc built at run time from protos/ (and Triton's KServe
// v2 service from the descriptors tritonclient ships), holding nothing but the CA certificate (or nothing, against a
// plaintext dev platform) and its tenant's credentials. It walks the tenant API end to end and checks the refusals,
// then prints one JSON line with what it saw. tests/clients/test_node.py runs it against a real `aidc up`.
//
//   node client.mjs config.json
//
// Any failed expectation throws: the process exits non-zero with the reason on stderr.

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const LOADER = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const DEADLINE_MS = 60_000;
const { status } = grpc;

// -- the contract, loaded from the .proto files and from Triton's descriptors ----------------------------------------

function protoFiles(root) {
  const found = [];
  for (const entry of readdirSync(root)) {
    const path = join(root, entry);
    if (statSync(path).isDirectory()) found.push(...protoFiles(path));
    else if (entry.endsWith(".proto")) found.push(relative(config.protos, path));
  }
  return found;
}

const aidc = grpc.loadPackageDefinition(
  protoLoader.loadSync(protoFiles(config.protos), { ...LOADER, includeDirs: [config.protos] }),
).aidc;
const inference = grpc.loadPackageDefinition(
  protoLoader.loadFileDescriptorSetFromBuffer(readFileSync(config.kserveDescriptorSet), LOADER),
).inference;

const credentials = config.caFile
  ? grpc.credentials.createSsl(readFileSync(config.caFile))
  : grpc.credentials.createInsecure();

const clients = {
  auth: new aidc.auth.v1.AuthService(config.addresses.auth, credentials),
  storage: new aidc.storage.v1.StorageService(config.addresses.storage, credentials),
  training: new aidc.training.v1.TrainingService(config.addresses.training, credentials),
  scheduler: new aidc.scheduler.v1.SchedulerService(config.addresses.scheduler, credentials),
  billing: new aidc.billing.v1.BillingService(config.addresses.billing, credentials),
  serving: new aidc.serving.v1.ServingService(config.addresses.serving, credentials),
  inference: new inference.GRPCInferenceService(config.addresses.serving, credentials),
};

// -- calls -----------------------------------------------------------------------------------------------------------

// W3C trace context: every call of this run joins one trace, each under a span id of its own (the caller's span).
function metadataFor(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  if (config.traceId) metadata.set("traceparent", `00-${config.traceId}-${randomBytes(8).toString("hex")}-01`);
  return metadata;
}

const options = () => ({ deadline: Date.now() + DEADLINE_MS });

function unary(client, method, request, token) {
  return new Promise((resolve, reject) => {
    client[method](request, metadataFor(token), options(), (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function serverStream(client, method, request, token, onMessage) {
  return new Promise((resolve, reject) => {
    const call = client[method](request, metadataFor(token), options());
    call.on("data", (message) => {
      if (onMessage(message) === false) call.cancel();
    });
    call.on("end", resolve);
    call.on("error", (error) => (error.code === status.CANCELLED ? resolve() : reject(error)));
  });
}

function clientStream(client, method, messages, token) {
  return new Promise((resolve, reject) => {
    const call = client[method](metadataFor(token), options(), (error, reply) => (error ? reject(error) : resolve(reply)));
    for (const message of messages) call.write(message);
    call.end();
  });
}

async function refusedWith(expected, promise, what) {
  try {
    await promise;
  } catch (error) {
    assert.ok(expected.includes(error.code), `${what}: ${error.code} ${error.details}, wanted ${expected}`);
    return error.code;
  }
  assert.fail(`${what}: answered, but should have been refused`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function eventually(probe, what, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = await probe();
    if (found) return found;
    assert.ok(Date.now() < deadline, `${what}: not seen in ${timeoutMs / 1000}s`);
    await sleep(500);
  }
}

// KServe v2 BYTES tensors travel as 4-byte little-endian lengths, each followed by its bytes.
function bytesTensor(strings) {
  return Buffer.concat(
    strings.flatMap((text) => {
      const bytes = Buffer.from(text, "utf8");
      const length = Buffer.alloc(4);
      length.writeUInt32LE(bytes.length);
      return [length, bytes];
    }),
  );
}

function readBytesTensor(buffer) {
  const out = [];
  for (let at = 0; at < buffer.length; ) {
    const length = buffer.readUInt32LE(at);
    out.push(buffer.subarray(at + 4, at + 4 + length).toString("utf8"));
    at += 4 + length;
  }
  return out;
}

function chunks(bytes, size) {
  const out = [];
  for (let at = 0; at < bytes.length; at += size) out.push(bytes.subarray(at, at + size));
  return out;
}

// -- the walk --------------------------------------------------------------------------------------------------------

const seen = { refusals: {} };
const { tenant, user, password } = config.account;
const other = config.otherAccount;

// Log in with a password, make an API key, and go on with the token the key is exchanged for.
const login = await unary(clients.auth, "Login", { tenant, name: user, password });
const loginToken = login.tokens.access_token;
const key = await unary(clients.auth, "CreateApiKey", { tenant, description: "node client" }, loginToken);
assert.match(key.secret, /^aidc_/);
const exchanged = await unary(clients.auth, "ExchangeApiKey", { api_key: key.secret });
const token = exchanged.tokens.access_token;
const me = await unary(clients.auth, "WhoAmI", {}, token);
assert.equal(me.subject, `user:${tenant}/${user}`);
seen.subject = me.subject;
const otherToken = (await unary(clients.auth, "Login", { tenant: other.tenant, name: other.user, password: other.password }))
  .tokens.access_token;

// A dataset: uploaded (client streaming), listed, downloaded back (server streaming) byte for byte.
const dataset = readFileSync(config.dataset.csvFile);
await unary(clients.storage, "CreateDataset", { tenant, name: config.dataset.name }, token);
const uploaded = await clientStream(
  clients.storage,
  "Upload",
  [
    {
      header: {
        tenant,
        kind: "OBJECT_KIND_DATASET",
        name: config.dataset.name,
        content_type: "text/csv",
        text_dataset: { format: "DATA_FORMAT_CSV" },
        expected_sha256: createHash("sha256").update(dataset).digest("hex"),
      },
    },
    ...chunks(dataset, 16 * 1024).map((chunk) => ({ chunk })),
  ],
  token,
);
assert.equal(Number(uploaded.object.size_bytes), dataset.length);
const listed = await unary(clients.storage, "ListDatasets", { tenant }, token);
assert.ok(listed.datasets.some((d) => d.name === config.dataset.name));
const parts = [];
let described = null;
await serverStream(clients.storage, "Download", { tenant, kind: "OBJECT_KIND_DATASET", name: config.dataset.name }, token, (m) => {
  if (m.payload === "object") described = m.object;
  else parts.push(m.chunk);
});
assert.ok(Buffer.concat(parts).equals(dataset), "the dataset came back changed");
assert.equal(described.sha256, createHash("sha256").update(dataset).digest("hex"));
seen.datasetBytes = dataset.length;

// The base model (a tiny BERT as a tarball artifact), registered; a fine-tune submitted and watched to its end.
const base = readFileSync(config.baseModel.tarFile);
await clientStream(
  clients.storage,
  "Upload",
  [
    { header: { tenant, kind: "OBJECT_KIND_ARTIFACT", name: config.baseModel.artifact } },
    ...chunks(base, 256 * 1024).map((chunk) => ({ chunk })),
  ],
  token,
);
await unary(
  clients.training,
  "RegisterBaseModel",
  { tenant, name: config.baseModel.name, artifact_name: config.baseModel.artifact },
  token,
);
const fineTune = {
  tenant,
  spec: {
    base_model: config.baseModel.name,
    dataset: { name: config.dataset.name },
    sequence_classification: {},
    hyperparameters: config.hyperparameters,
    output_model: config.model,
  },
};
if (config.fineTunes) {
  const submitted = await unary(clients.training, "SubmitFineTune", fineTune, token);
  const jobId = submitted.job.job_id;
  const states = [];
  const TERMINAL = ["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"];
  await serverStream(clients.training, "WatchJob", { tenant, job_id: jobId }, token, (m) => {
    if (m.event.event === "state_change") states.push(m.event.state_change.to_state);
    return !TERMINAL.includes(states.at(-1));
  });
  const job = (await unary(clients.training, "GetJob", { tenant, job_id: jobId }, token)).job;
  assert.equal(job.state, "JOB_STATE_SUCCEEDED", `fine-tune ended ${job.state}: ${job.error}`);
  seen.jobStates = states;
  seen.modelVersion = Number(job.model_version);

  // Deployed into Triton; raw text classified through the gateway (Triton's own KServe v2 API).
  const deployed = await unary(clients.serving, "Deploy", { tenant, model: config.model, wait: true }, token);
  assert.equal(deployed.deployment.state, "DEPLOYMENT_STATE_READY", deployed.deployment.last_error);
  const ready = await unary(clients.inference, "ModelReady", { name: config.model }, token);
  assert.equal(ready.ready, true);
  const answer = await unary(
    clients.inference,
    "ModelInfer",
    {
      model_name: config.model,
      inputs: [{ name: "TEXT", datatype: "BYTES", shape: [config.texts.length, 1] }],
      outputs: [{ name: "LABEL" }],
      raw_input_contents: [bytesTensor(config.texts)],
    },
    token,
  );
  assert.equal(answer.model_name, config.model);
  seen.labels = readBytesTensor(answer.raw_output_contents[answer.outputs.findIndex((o) => o.name === "LABEL")]);
  assert.equal(seen.labels.length, config.texts.length);
} else {
  // Plaintext dev mode: training has no service identity to ask the scheduler with, so it refuses up front.
  seen.refusals.fineTuneWithoutMesh = await refusedWith(
    [status.FAILED_PRECONDITION],
    unary(clients.training, "SubmitFineTune", fineTune, token),
    "a fine-tune in plaintext dev mode",
  );
}

const pools = await unary(clients.scheduler, "ListPools", { tenant }, token);
seen.pools = pools.pools.map((p) => p.name);

// What it cost: the gateway meters every request to billing. (In plaintext dev mode services have no identity to
// deliver usage with, so it waits in their outboxes: there the query must answer, and nothing more.)
const usageOf = async () => {
  const usage = await unary(clients.billing, "QueryUsage", { tenant, meter: "inference_requests" }, token);
  return usage.buckets.reduce((sum, b) => sum + Number(b.value), 0);
};
seen.inferenceRequests = config.expectUsage
  ? await eventually(async () => ((await usageOf()) >= 1 ? await usageOf() : null), "inference usage in billing")
  : await usageOf();

// Refusals: no token, a tampered token, another tenant's dataset and model, an RPC only mesh services may call.
const [head, payload, signature] = token.split(".");
const tampered = `${head}.${payload}.${signature.slice(0, -4)}${signature.slice(-4) === "AAAA" ? "BBBB" : "AAAA"}`;
seen.refusals.noToken = await refusedWith([status.UNAUTHENTICATED], unary(clients.storage, "ListDatasets", { tenant }), "no token");
seen.refusals.tamperedToken = await refusedWith(
  [status.UNAUTHENTICATED],
  unary(clients.storage, "ListDatasets", { tenant }, tampered),
  "tampered token",
);
seen.refusals.noTokenInference = await refusedWith(
  [status.UNAUTHENTICATED],
  unary(clients.inference, "ModelInfer", { model_name: config.model }),
  "inference without a token",
);
seen.refusals.otherTenantsDataset = await refusedWith(
  [status.PERMISSION_DENIED, status.NOT_FOUND],
  serverStream(clients.storage, "Download", { tenant, kind: "OBJECT_KIND_DATASET", name: config.dataset.name }, otherToken, () => {}),
  "another tenant's dataset",
);
seen.refusals.otherTenantsModel = await refusedWith(
  [status.PERMISSION_DENIED, status.NOT_FOUND],
  unary(
    clients.inference,
    "ModelInfer",
    {
      model_name: `${tenant}/${config.model}`,
      inputs: [{ name: "TEXT", datatype: "BYTES", shape: [1, 1] }],
      raw_input_contents: [bytesTensor(["hello"])],
    },
    otherToken,
  ),
  "another tenant's model",
);
seen.refusals.otherTenantsModelVersion = await refusedWith(
  [status.PERMISSION_DENIED, status.NOT_FOUND],
  unary(clients.training, "GetModelVersion", { tenant, model: config.model, version: seen.modelVersion ?? 1 }, otherToken),
  "another tenant's model version",
);
seen.refusals.recordUsage = await refusedWith(
  [status.PERMISSION_DENIED],
  unary(clients.billing, "RecordUsage", { tenant, events: [] }, token),
  "RecordUsage (mesh services only)",
);

for (const client of Object.values(clients)) client.close();
console.log(JSON.stringify(seen));

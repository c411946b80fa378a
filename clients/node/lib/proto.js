'use strict';
// Loads the keybroker API from its .proto at run time (no generated code to go stale).
//
// The proto is looked up in two places: `proto/` inside this package (copied there
// by `npm pack`, see scripts/protos.mjs) and the repository's `protos/` directory
// (a checkout, where the package is used straight from clients/node). The Google
// well-known types it imports (Duration, Timestamp) come with protobufjs.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_FILE = 'keybroker/v1/keybroker.proto';
const SEARCH = [
  path.join(__dirname, '..', 'proto'),
  path.join(__dirname, '..', '..', '..', 'protos'),
];

// int64 fields arrive as decimal strings and are converted with toSafeInt (below),
// enums as their names, unset message fields as null.
const LOADER_OPTIONS = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

function protoRoot() {
  for (const dir of SEARCH) {
    if (fs.existsSync(path.join(dir, PROTO_FILE))) return dir;
  }
  throw new Error(`keybroker: ${PROTO_FILE} not found in ${SEARCH.join(' or ')}`);
}

let cached = null;

/** The loaded package: { KeyBroker, KeyAdmin } service client constructors. */
function api() {
  if (cached === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      ...LOADER_OPTIONS,
      includeDirs: [protoRoot()],
    });
    cached = grpc.loadPackageDefinition(definition).keybroker.v1;
  }
  return cached;
}

/**
 * An int64 (decimal string, number or bigint) as a JS number, refusing to lose
 * precision: values beyond Number.MAX_SAFE_INTEGER raise a RangeError.
 */
function toSafeInt(value) {
  if (value === null || value === undefined || value === '') return 0;
  const big = BigInt(value);
  if (big > BigInt(Number.MAX_SAFE_INTEGER) || big < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new RangeError(`int64 value ${big} does not fit a JS number safely`);
  }
  return Number(big);
}

/** google.protobuf.Duration (or null) -> seconds as a float. */
function durationSeconds(d) {
  if (!d) return 0;
  return toSafeInt(d.seconds) + (d.nanos || 0) / 1e9;
}

/** Seconds (float) -> google.protobuf.Duration, or null for undefined/null. */
function toDuration(seconds) {
  if (seconds === undefined || seconds === null) return null;
  if (typeof seconds !== 'number' || !Number.isFinite(seconds) || seconds < 0) {
    throw new TypeError(`expected a duration in seconds >= 0, got ${seconds}`);
  }
  let whole = Math.floor(seconds);
  let nanos = Math.round((seconds - whole) * 1e9);
  if (nanos >= 1e9) {
    whole += 1;
    nanos -= 1e9;
  }
  return { seconds: String(whole), nanos };
}

/** google.protobuf.Timestamp (or null) -> Date (or null). */
function toDate(ts) {
  if (!ts) return null;
  return new Date(toSafeInt(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

module.exports = { api, durationSeconds, toDate, toDuration, toSafeInt, protoRoot, PROTO_FILE };

// Unit tests that need no broker: int64 and Duration conversion, google.rpc.Status
// decoding, and the proto loading the client does at run time.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { toSafeInt, toDuration, durationSeconds, toDate, api } = require('../lib/proto.js');
const { RPC, decodeStatus } = require('../lib/errors.js');
const client = require('@keybroker/client');

test('int64 strings convert to numbers exactly and refuse to lose precision', () => {
  assert.equal(toSafeInt('9007199254740991'), Number.MAX_SAFE_INTEGER);
  assert.equal(toSafeInt('-42'), -42);
  assert.equal(toSafeInt(null), 0);
  assert.throws(() => toSafeInt('9007199254740993'), RangeError);
});

test('seconds round-trip through google.protobuf.Duration', () => {
  assert.deepEqual(toDuration(1.5), { seconds: '1', nanos: 500_000_000 });
  assert.deepEqual(toDuration(0.9999999999), { seconds: '1', nanos: 0 });
  assert.equal(toDuration(undefined), null);
  assert.equal(durationSeconds({ seconds: '43200', nanos: 250_000_000 }), 43200.25);
  assert.throws(() => toDuration(-1), TypeError);
  assert.equal(toDate({ seconds: '1773187200', nanos: 0 }).toISOString(), '2026-03-11T00:00:00.000Z');
});

test('a google.rpc.Status with ErrorInfo and RetryInfo decodes to its details', () => {
  const Status = RPC.lookupType('google.rpc.Status');
  const pack = (name, value) => {
    const type = RPC.lookupType(name);
    return { typeUrl: `type.googleapis.com/${name}`, value: type.encode(type.fromObject(value)).finish() };
  };
  const bytes = Status.encode(Status.fromObject({
    code: 8,
    message: 'no key has quota left',
    details: [
      pack('google.rpc.ErrorInfo', { reason: 'QUOTA_EXHAUSTED', domain: 'keybroker.v1' }),
      pack('google.rpc.RetryInfo', { retryDelay: { seconds: 30, nanos: 5e8 } }),
      { typeUrl: 'type.googleapis.com/some.Unknown', value: Buffer.from([1, 2]) },
    ],
  })).finish();
  const status = decodeStatus(Buffer.from(bytes));
  assert.equal(status.code, 8);
  assert.deepEqual(status.details.map((d) => d.type), ['google.rpc.ErrorInfo', 'google.rpc.RetryInfo']);
  assert.equal(status.details[0].value.reason, 'QUOTA_EXHAUSTED');
  assert.equal(durationSeconds(status.details[1].value.retryDelay), 30.5);
});

test('the proto loads with both services and every RPC the Python client has', () => {
  const { KeyBroker, KeyAdmin } = api();
  assert.deepEqual(Object.keys(KeyBroker.service), ['LeaseKey', 'RenewLease', 'ReportUsage', 'Complete']);
  assert.deepEqual(Object.keys(KeyAdmin.service),
    ['ListKeys', 'GetKey', 'SetKeyEnabled', 'ReloadKeys', 'GetUsage', 'ClearCooldown',
      'RotateKey', 'RevokeKey', 'ProvisionKeys']);
});

test('the package exports exactly the documented names', () => {
  assert.deepEqual(Object.keys(client).sort(), [
    'BrokerError', 'InvalidArgument', 'KeyBrokerClient', 'Lease', 'LeaseNotActive', 'NotFound',
    'PermissionDenied', 'QuotaExhausted', 'Unauthenticated', 'Unavailable', 'openRouterUsage',
  ]);
  for (const name of ['QuotaExhausted', 'PermissionDenied', 'Unauthenticated', 'Unavailable']) {
    assert.ok(new client[name]('x') instanceof client.BrokerError, name);
  }
});

test('openRouterUsage reads budget, credit and upstream errors from the body and headers', () => {
  const inFlight = client.openRouterUsage(402, { error: { code: 402, message: 'in_flight_budget_exhausted: retry',
    metadata: { limit_source: 'openrouter_in_flight_budget' } } }, { 'retry-after': '2' });
  assert.deepEqual(inFlight, { httpStatus: 402, errorReason: 'in_flight_budget_exhausted',
    limitSource: 'openrouter_in_flight_budget', retryAfterSeconds: 2 });
  const budget = client.openRouterUsage(403, { error: { code: 403, message: 'Budget limit exceeded',
    metadata: { limit_source: 'openrouter_guardrail_budget', resets_at: '2026-03-11T00:00:00Z' } } });
  assert.equal(budget.resetsAt.toISOString(), '2026-03-11T00:00:00.000Z');
  const platform = client.openRouterUsage(429, { error: { code: 429, message: 'Rate limit exceeded: free-models-per-day',
    metadata: { headers: { 'X-RateLimit-Limit': '50', 'X-RateLimit-Remaining': '0', 'X-RateLimit-Reset': '1773187200000' },
      provider_name: null } } });
  assert.equal(platform.upstreamProvider, undefined);
  assert.equal(platform.ratelimitResetMs, '1773187200000');
  // An in-band stream error chunk (HTTP 200) is reported as its own status, never success.
  const chunk = client.openRouterUsage(200, { error: { code: 429, message: 'Provider returned error',
    metadata: { provider_name: 'Chutes', retry_after_seconds: 1 } }, choices: [{ finish_reason: 'error' }] });
  assert.deepEqual(chunk, { httpStatus: 429, upstreamProvider: 'Chutes', retryAfterSeconds: 1 });
});

test('a server that drops every connection gives Unavailable, a named BrokerError', async () => {
  const server = net.createServer((socket) => socket.destroy());
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const c = new client.KeyBrokerClient(`127.0.0.1:${server.address().port}`, { token: 't', timeoutMs: 5000 });
  try {
    await assert.rejects(c.leaseKey({ pool: 'free' }), (err) => {
      assert.ok(err instanceof client.Unavailable, `expected Unavailable, got ${err}`);
      assert.ok(err instanceof client.BrokerError);
      assert.equal(err.codeName, 'UNAVAILABLE');
      return true;
    });
  } finally {
    c.close();
    await new Promise((resolve) => server.close(resolve));
  }
});

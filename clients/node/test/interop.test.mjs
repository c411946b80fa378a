// Interop: this client against a real broker started by the Python test suite
// (tests/test_node_client.py). The broker runs with a daily limit of 2 on the
// one key of pool "free" (account acct-a) and one key in pool "paid"; its clock
// stands still at 12:00 UTC. The tests run in order and share that quota.
//
// Environment: KEYBROKER_TARGET (host:port) and KEYBROKER_TOKEN_ALICE, _CAROL,
// _ADMIN. Without KEYBROKER_TARGET the tests are skipped (`npm test` alone).
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { inspect } from 'node:util';

import {
  BrokerError,
  InvalidArgument,
  KeyBrokerClient,
  LeaseNotActive,
  openRouterUsage,
  NotFound,
  PermissionDenied,
  QuotaExhausted,
  Unauthenticated,
} from '@keybroker/client';

const env = process.env;
const target = env.KEYBROKER_TARGET;

describe('node client against a real broker', { skip: target ? false : 'KEYBROKER_TARGET not set' }, () => {
  const clients = [];
  const connect = (token) => {
    const c = new KeyBrokerClient(target, { token, timeoutMs: 10_000 });
    clients.push(c);
    return c;
  };
  const alice = target && connect(env.KEYBROKER_TOKEN_ALICE);
  const admin = target && connect(env.KEYBROKER_TOKEN_ADMIN);
  const accountUsage = async () => {
    const [key] = await admin.listKeys('free');
    return { used: key.accountUsedToday, active: key.activeLeases };
  };
  after(() => clients.forEach((c) => c.close()));

  test('lease() leases, reports and completes as used', async () => {
    let seen;
    const result = await alice.lease({ pool: 'free', model: 'm:free', ttlSeconds: 30 }, async (lease) => {
      seen = lease;
      assert.equal(lease.route, 'external');
      assert.equal(lease.keyId, 'free/k1');
      assert.match(lease.apiKey, /^sk-or-v1-test-/);
      assert.equal(lease.remainingAccountToday, 1);
      assert.equal(typeof lease.remainingKeyToday, 'number');
      // Clock at 12:00 UTC: a 30 s lease expires 11h59m30s before the day resets.
      assert.equal(lease.resetsAt - lease.expiresAt, 12 * 3600_000 - 30_000);
      assert.deepEqual(await accountUsage(), { used: 1, active: 1 });
      const health = await lease.report({
        httpStatus: 200, promptTokens: 12, completionTokens: 34n, latencyMs: '420', cost: 0, model: 'm:free',
      });
      assert.equal(health.health, 'healthy');
      return 'answer';
    });
    assert.equal(result, 'answer');
    assert.equal(seen.used, true);
    assert.deepEqual(await accountUsage(), { used: 1, active: 0 });
    // The secret stays out of logs and JSON.
    assert.doesNotMatch(JSON.stringify(seen), /sk-or-v1/);
    assert.doesNotMatch(inspect(seen), /sk-or-v1/);
  });

  test('lease() refunds when the callback throws before the call went out', async () => {
    await assert.rejects(
      alice.lease({ pool: 'free' }, async () => { throw new Error('failed before calling the provider'); }),
      /failed before calling the provider/);
    assert.deepEqual(await accountUsage(), { used: 1, active: 0 });
  });

  test('lease() keeps the charge when the callback throws after markUsed()', async () => {
    await assert.rejects(alice.lease({ pool: 'free' }, async (lease) => {
      lease.markUsed();
      throw new Error('failed while parsing the answer');
    }), /parsing/);
    assert.deepEqual(await accountUsage(), { used: 2, active: 0 });
  });

  test('exhaustion throws QuotaExhausted with retryAfter from RetryInfo', async () => {
    const err = await alice.leaseKey({ pool: 'free' }).then(() => null, (e) => e);
    assert.ok(err instanceof QuotaExhausted, `expected QuotaExhausted, got ${err}`);
    assert.ok(err instanceof BrokerError);
    assert.equal(err.codeName, 'RESOURCE_EXHAUSTED');
    assert.equal(err.reason, 'QUOTA_EXHAUSTED');
    // The test clock stands at 12:00 UTC: the day frees up in 12 hours.
    assert.ok(err.retryAfter > 0, `retryAfter ${err.retryAfter}`);
    assert.ok(Math.abs(err.retryAfter - 12 * 3600) < 1, `retryAfter ${err.retryAfter}`);
    assert.ok(err.violations.some((v) => v.subject === 'account:acct-a/day'), JSON.stringify(err.violations));
  });

  test('allowInternal answers route internal instead of throwing', async () => {
    const lease = await alice.leaseKey({ pool: 'free', allowInternal: true });
    assert.equal(lease.route, 'internal');
    assert.equal(lease.external, false);
    assert.equal(lease.internalReason, 'quota_exhausted');
    assert.ok(lease.retryAfter > 0);
  });

  test('admin calls read and steer keys, never returning secrets', async () => {
    const key = await admin.getKey('free/k1');
    assert.equal(key.account, 'acct-a');
    assert.equal(key.accountDailyLimit, 2);
    assert.equal(key.accountRemainingToday, 0);
    assert.equal(key.health, 'healthy');
    assert.doesNotMatch(JSON.stringify(key), /sk-or-v1/);
    const disabled = await admin.setKeyEnabled('paid/p1', false, 'node interop');
    assert.equal(disabled.enabled, false);
    assert.equal((await admin.setKeyEnabled('paid/p1', true)).enabled, true);
    const reload = await admin.reloadKeys();
    assert.equal(reload.total, 2);
    const usage = await admin.usage({ days: 1, groupBy: ['principal'] });
    assert.ok(usage.length >= 1 && usage.every((row) => row.requests >= 1), JSON.stringify(usage));
    await assert.rejects(admin.usage({ groupBy: ['weekday'] }), RangeError);
    await assert.rejects(admin.getKey('free/missing'), NotFound);
  });

  test('listKeys, iterKeys and usage follow every page; a bad page token is InvalidArgument', async () => {
    const first = await admin.listKeysPage({ pageSize: 1 });
    assert.deepEqual(first.keys.map((k) => k.keyId), ['free/k1']);
    assert.ok(first.nextPageToken);
    const second = await admin.listKeysPage({ pageSize: 1, pageToken: first.nextPageToken });
    assert.deepEqual(second.keys.map((k) => k.keyId), ['paid/p1']);
    assert.equal(second.nextPageToken, '');
    const iterated = [];
    for await (const key of admin.iterKeys('', { pageSize: 1 })) iterated.push(key.keyId);
    assert.deepEqual(iterated, ['free/k1', 'paid/p1']);
    assert.deepEqual((await admin.listKeys()).map((k) => k.keyId), iterated);
    const page = await admin.usagePage({ days: 1, groupBy: ['principal'], pageSize: 1 });
    assert.equal(page.rows.length, 1);
    const rows = [];
    for await (const row of admin.iterUsage({ days: 1, groupBy: ['principal'], pageSize: 1 })) rows.push(row);
    assert.deepEqual(rows, await admin.usage({ days: 1, groupBy: ['principal'] }));
    await assert.rejects(admin.listKeysPage({ pool: 'paid', pageToken: first.nextPageToken }),
      (err) => err instanceof InvalidArgument && err.field === 'page_token');
    await assert.rejects(admin.listKeysPage({ pageSize: -1 }),
      (err) => err instanceof InvalidArgument && err.field === 'page_size');
  });

  test('renew and complete work on a live lease; a finished one is LeaseNotActive', async () => {
    const bob = connect(env.KEYBROKER_TOKEN_ALICE);
    const lease = await bob.leaseKey({ pool: 'paid', ttlSeconds: 5 });
    const expires = await bob.renew(lease.leaseId, 120);
    assert.ok(expires > lease.expiresAt);
    assert.deepEqual(await bob.complete(lease.leaseId, false), { state: 'completed', refunded: true });
    assert.deepEqual(await bob.complete(lease.leaseId, false), { state: 'completed', refunded: true });
    await assert.rejects(bob.renew(lease.leaseId, 60), LeaseNotActive);
  });

  test('a bad field throws InvalidArgument naming it', async () => {
    const err = await alice.leaseKey({ pool: 'free', units: 5000 }).then(() => null, (e) => e);
    assert.ok(err instanceof InvalidArgument, `expected InvalidArgument, got ${err}`);
    assert.equal(err.field, 'units');
  });

  test('carol may not lease from pool paid: PermissionDenied', async () => {
    const carol = connect(env.KEYBROKER_TOKEN_CAROL);
    const err = await carol.leaseKey({ pool: 'paid' }).then(() => null, (e) => e);
    assert.ok(err instanceof PermissionDenied, `expected PermissionDenied, got ${err}`);
    assert.equal(err.reason, 'PERMISSION_DENIED');
  });

  test('a bad token is Unauthenticated', async () => {
    const stranger = connect('kbt_not_a_real_token_000000000000');
    await assert.rejects(stranger.leaseKey({ pool: 'free' }), (err) => {
      assert.ok(err instanceof Unauthenticated, `expected Unauthenticated, got ${err}`);
      assert.equal(err.reason, 'UNAUTHENTICATED');
      return true;
    });
  });

  // lease() completes every lease it takes (pool "paid", whose one key the tests above
  // left with nothing spent and no lease active).
  const paidUsage = async () => {
    const [key] = await admin.listKeys('paid');
    return { used: key.accountUsedToday, active: key.activeLeases };
  };

  test('lease() refuses a callback that is not a function before taking a lease', async () => {
    // carol may not lease from paid: asking the broker would answer PermissionDenied.
    const carol = connect(env.KEYBROKER_TOKEN_CAROL);
    await assert.rejects(carol.lease({ pool: 'paid' }, 'not a function'), TypeError);
    await assert.rejects(alice.lease({ pool: 'paid' }, undefined), TypeError);
    assert.deepEqual(await paidUsage(), { used: 0, active: 0 });
  });

  test('lease() refunds when the callback throws synchronously or rejects with a non-Error', async () => {
    await assert.rejects(alice.lease({ pool: 'paid' }, () => { throw new RangeError('sync'); }), RangeError);
    await assert.rejects(alice.lease({ pool: 'paid' }, async () => { throw 'a string'; }),
      (thrown) => thrown === 'a string');
    assert.deepEqual(await paidUsage(), { used: 0, active: 0 });
  });

  test('lease() lets a report the callback did not await reach the broker, then completes as used', async () => {
    const result = await alice.lease({ pool: 'paid' }, (lease) => {
      void lease.report({ httpStatus: 502, errorType: 'provider_error', latencyMs: 5 });
      return 'answer';
    });
    assert.equal(result, 'answer');
    assert.deepEqual(await paidUsage(), { used: 1, active: 0 });
    const rows = await admin.usage({ days: 1, groupBy: ['key'], pool: 'paid' });
    assert.deepEqual(rows.map((r) => [r.requests, r.failures]), [['1', '1']]);
  });

  test('an upstream 429 read from the error body cools the model pool-wide, not the account', async () => {
    const body = { error: { code: 429, message: 'Provider returned error', metadata: {
      raw: 'vendor/m is temporarily rate-limited upstream', provider_name: 'Upstream',
      is_byok: false, retry_after_seconds: 30, headers: { 'Retry-After': '30' } } } };
    const usage = openRouterUsage(429, body, {});
    assert.equal(usage.upstreamProvider, 'Upstream');
    assert.equal(usage.retryAfterSeconds, 30);
    const lease = await alice.leaseKey({ pool: 'paid', model: 'vendor/m' });
    await lease.report({ ...usage, model: 'vendor/m' });
    await alice.complete(lease.leaseId, false);
    const err = await alice.leaseKey({ pool: 'paid', model: 'vendor/m' }).then(() => null, (e) => e);
    assert.ok(err instanceof QuotaExhausted, `expected QuotaExhausted, got ${err}`);
    assert.ok(err.violations.some((v) => v.subject === 'model:paid/vendor/m'), JSON.stringify(err.violations));
    assert.ok(err.retryAfter > 25 && err.retryAfter <= 30, `retryAfter ${err.retryAfter}`);
    const other = await alice.leaseKey({ pool: 'paid', model: 'vendor/other' });  // the account is fine
    assert.equal(other.route, 'external');
    await alice.complete(other.leaseId, false);
  });
});

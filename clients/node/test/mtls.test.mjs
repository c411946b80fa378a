// mTLS interop: this client against a real TLS broker that requires client
// certificates (started by tests/test_node_client.py). The certificate's CN names
// the principal "svc-mtls", a consumer of pool "free" only; no bearer token is sent.
//
// Environment: KEYBROKER_TLS_TARGET (host:port), KEYBROKER_CA_FILE,
// KEYBROKER_CLIENT_CERT_FILE and KEYBROKER_CLIENT_KEY_FILE (PEM files).
// Without KEYBROKER_TLS_TARGET the tests are skipped (`npm test` alone).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, describe, test } from 'node:test';

import { KeyBrokerClient, PermissionDenied, Unavailable } from '@keybroker/client';

const env = process.env;
const target = env.KEYBROKER_TLS_TARGET;

describe('node client over mTLS', { skip: target ? false : 'KEYBROKER_TLS_TARGET not set' }, () => {
  const clients = [];
  const connect = (options) => {
    const c = new KeyBrokerClient(target, { timeoutMs: 10_000, ...options });
    clients.push(c);
    return c;
  };
  after(() => clients.forEach((c) => c.close()));

  test('a client certificate given as file paths names the principal', async () => {
    const svc = connect({
      rootCerts: env.KEYBROKER_CA_FILE,
      clientCert: env.KEYBROKER_CLIENT_CERT_FILE,
      clientKey: env.KEYBROKER_CLIENT_KEY_FILE,
    });
    const lease = await svc.leaseKey({ pool: 'free' });
    assert.equal(lease.keyId, 'free/k1');
    assert.deepEqual(await svc.complete(lease.leaseId, false), { state: 'completed', refunded: true });
    await assert.rejects(svc.leaseKey({ pool: 'paid' }), PermissionDenied);
  });

  test('the same certificate given as Buffers works too', async () => {
    const svc = connect({
      rootCerts: readFileSync(env.KEYBROKER_CA_FILE),
      clientCert: readFileSync(env.KEYBROKER_CLIENT_CERT_FILE),
      clientKey: readFileSync(env.KEYBROKER_CLIENT_KEY_FILE),
    });
    const done = await svc.lease({ pool: 'free' }, async (lease) => {
      await lease.report({ httpStatus: 200, latencyMs: 5 });
      return lease.leaseId;
    });
    assert.match(done, /^ls_[0-9a-f]{32}$/);
  });

  test('without a client certificate the handshake is refused: Unavailable', async () => {
    const anonymous = connect({ rootCerts: env.KEYBROKER_CA_FILE });
    await assert.rejects(anonymous.leaseKey({ pool: 'free' }), Unavailable);
  });
});

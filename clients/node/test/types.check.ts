// Compiled by `npm run typecheck` (tsc --noEmit), never run: the declarations in
// index.d.ts describe the surface a TypeScript caller writes against.
import {
  BrokerError,
  KeyBrokerClient,
  type KeyInfo,
  type KeysPage,
  type Lease,
  QuotaExhausted,
  type UsagePage,
} from '@keybroker/client';

async function example(): Promise<number> {
  const client = new KeyBrokerClient('127.0.0.1:50051', { token: 'kbt_x', timeoutMs: 5000 });
  const tokens: number = await client.lease({ pool: 'free', model: 'm', priority: 'low' },
    async (lease: Lease) => {
      const health = await lease.report({ httpStatus: 200, promptTokens: 12n, latencyMs: 420 });
      const cooling: boolean = health.health === 'cooling_down';
      return cooling ? 0 : lease.remainingAccountToday;
    });
  try {
    const lease = await client.leaseKey({ pool: 'free', ttlSeconds: 30, requestId: 'r-1' });
    const expires: Date | null = await client.renew(lease.leaseId, 60);
    const done = await client.complete(lease.leaseId, false);
    const refunded: boolean = done.refunded && expires !== null;
    void refunded;
  } catch (err) {
    if (err instanceof QuotaExhausted) return err.retryAfter;
    if (err instanceof BrokerError) return err.code;
    throw err;
  }
  const keys: KeyInfo[] = await client.listKeys('free');
  const page: KeysPage = await client.listKeysPage({ pool: 'free', pageSize: 100 });
  for await (const k of client.iterKeys('free', { pageSize: 100 })) void k.keyId;
  const rows: UsagePage = await client.usagePage({ days: 1, groupBy: ['key'], pageToken: page.nextPageToken });
  for await (const r of client.iterUsage({ days: 1 })) void r.requests;
  void rows.nextPageToken;
  const key = await client.setKeyEnabled(keys[0].keyId, false, 'rotating');
  const reload = await client.reloadKeys();
  client.close();
  return tokens + key.usedToday + reload.total;
}

void example;

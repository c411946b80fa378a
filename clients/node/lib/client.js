'use strict';
// KeyBrokerClient: promise-based calls of KeyBroker and KeyAdmin, and lease().

const fs = require('node:fs');
const util = require('node:util');
const grpc = require('@grpc/grpc-js');
const { api, durationSeconds, toDate, toDuration, toSafeInt } = require('./proto');
const { fromServiceError } = require('./errors');

const PRIORITY = { high: 'PRIORITY_HIGH', normal: 'PRIORITY_NORMAL', low: 'PRIORITY_LOW' };

// "KEY_HEALTH_COOLING_DOWN" -> "cooling_down" (prefix of the enum dropped, lower case).
function enumName(value, prefix) {
  if (!value || value.endsWith('_UNSPECIFIED')) return '';
  return value.startsWith(prefix) ? value.slice(prefix.length).toLowerCase() : value.toLowerCase();
}

function pem(value, what) {
  if (value === undefined || value === null) return null;
  if (Buffer.isBuffer(value)) return value;
  if (typeof value === 'string') return fs.readFileSync(value); // a path, as in the Python client
  throw new TypeError(`${what}: expected a Buffer of PEM or a file path`);
}

function keyInfo(k) {
  return {
    keyId: k.keyId,
    pool: k.pool,
    name: k.name,
    account: k.account,
    baseUrl: k.baseUrl,
    models: [...k.models],
    enabled: k.enabled,
    health: enumName(k.health, 'KEY_HEALTH_'),
    healthReason: k.healthReason,
    cooldownUntil: toDate(k.cooldownUntil),
    usedToday: toSafeInt(k.usedToday),
    accountDailyLimit: toSafeInt(k.accountDailyLimit),
    accountMinuteLimit: toSafeInt(k.accountMinuteLimit),
    accountUsedToday: toSafeInt(k.accountUsedToday),
    accountRemainingToday: toSafeInt(k.accountRemainingToday),
    keyDailyLimit: toSafeInt(k.keyDailyLimit),
    keyMinuteLimit: toSafeInt(k.keyMinuteLimit),
    activeLeases: toSafeInt(k.activeLeases),
    strategy: k.strategy,
  };
}

function int64Field(value, what) {
  if (value === undefined || value === null) return undefined;
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'number' && Number.isSafeInteger(value)) return String(value);
  if (typeof value === 'string' && /^-?\d+$/.test(value)) return value;
  throw new TypeError(`${what}: expected an integer (number, bigint or decimal string), got ${value}`);
}

/**
 * One leased key (route "external") or an internal-route answer.
 *
 * `apiKey` is the provider secret: it is not enumerable, so it stays out of
 * JSON.stringify and console.log; keep it in memory only. Calling `report()`
 * or `markUsed()` records that the provider call went out, so a failing
 * `lease()` callback no longer refunds it.
 */
class Lease {
  constructor(r, client) {
    this.leaseId = r.leaseId;
    this.keyId = r.keyId;
    Object.defineProperty(this, 'apiKey', { value: r.apiKey, enumerable: false });
    Object.defineProperty(this, '_client', { value: client, enumerable: false });
    // Reports sent for this lease; lease() lets them finish before it completes the lease.
    Object.defineProperty(this, '_reports', { value: [], enumerable: false });
    this.baseUrl = r.baseUrl;
    this.model = r.model;
    this.account = r.account;
    this.units = r.units;
    this.expiresAt = toDate(r.expiresAt);
    this.resetsAt = toDate(r.resetsAt);
    this.remainingKeyToday = toSafeInt(r.remainingKeyToday);
    this.remainingAccountToday = toSafeInt(r.remainingAccountToday);
    this.route = r.route === 'ROUTE_INTERNAL' ? 'internal' : 'external';
    this.internalReason = enumName(r.internalReason, 'INTERNAL_REASON_');
    this.retryAfter = durationSeconds(r.retryAfter);
    this.used = false;
  }

  /** true when the broker handed out a key. */
  get external() {
    return this.route === 'external';
  }

  /** Record that the provider call went out (no refund on failure). */
  markUsed() {
    this.used = true;
  }

  /** Report the provider's answer for this lease; marks the lease used. */
  report(usage) {
    this.used = true;
    const sent = this._client.reportUsage(this.leaseId, usage);
    this._reports.push(sent);
    return sent;
  }

  [util.inspect.custom]() {
    return `Lease(${this.leaseId} ${this.keyId || this.route}, apiKey=<hidden>)`;
  }
}

/** Client of a keybroker: KeyBroker calls for callers, KeyAdmin calls for platform teams. */
class KeyBrokerClient {
  /**
   * @param {string} target host:port of the broker.
   * @param {object} [options]
   * @param {string} [options.token] bearer token; omit when a client certificate names the principal.
   * @param {Buffer|string} [options.rootCerts] CA bundle (PEM Buffer or file path); enables TLS.
   * @param {Buffer|string} [options.clientCert] client certificate for mTLS (PEM Buffer or path).
   * @param {Buffer|string} [options.clientKey] its private key (PEM Buffer or path).
   * @param {number} [options.timeoutMs] deadline of every call; none by default.
   * @param {object} [options.channelOptions] grpc-js channel options.
   */
  constructor(target, options = {}) {
    const { token, rootCerts, clientCert, clientKey, timeoutMs, channelOptions = {} } = options;
    let creds;
    if (rootCerts != null || clientCert != null) {
      creds = grpc.credentials.createSsl(pem(rootCerts, 'rootCerts'), pem(clientKey, 'clientKey'),
        pem(clientCert, 'clientCert'));
    } else {
      creds = grpc.credentials.createInsecure();
    }
    const { KeyBroker, KeyAdmin } = api();
    // One channel for both services.
    this._broker = new KeyBroker(target, creds, channelOptions);
    this._admin = new KeyAdmin(target, creds, {
      ...channelOptions, channelOverride: this._broker.getChannel(),
    });
    this._token = token || '';
    this._timeoutMs = timeoutMs;
  }

  /** Close the channel; pending calls fail with Unavailable. */
  close() {
    this._broker.close();
  }

  _call(stub, method, request) {
    const metadata = new grpc.Metadata();
    // Sent per call (not as call credentials) so it also works on plaintext loopback channels.
    if (this._token) metadata.set('authorization', `Bearer ${this._token}`);
    const callOptions = this._timeoutMs ? { deadline: Date.now() + this._timeoutMs } : {};
    return new Promise((resolve, reject) => {
      stub[method](request, metadata, callOptions, (err, response) => {
        if (err) reject(fromServiceError(err));
        else resolve(response);
      });
    });
  }

  /**
   * Lease one key of `pool` (KeyBroker.LeaseKey).
   * @returns {Promise<Lease>}
   */
  async leaseKey({ pool, model = '', units = 1, priority = 'normal', requestId = '',
    ttlSeconds, allowInternal = false } = {}) {
    if (!(priority in PRIORITY)) throw new TypeError(`priority: one of ${Object.keys(PRIORITY).join(', ')}`);
    const r = await this._call(this._broker, 'LeaseKey', {
      pool, model, units, priority: PRIORITY[priority], requestId,
      ttl: toDuration(ttlSeconds), allowInternal,
    });
    return new Lease(r, this);
  }

  /** Extend an active lease by `ttlSeconds` from now; resolves to the new expiry. */
  async renew(leaseId, ttlSeconds) {
    const r = await this._call(this._broker, 'RenewLease', { leaseId, ttl: toDuration(ttlSeconds) });
    return toDate(r.expiresAt);
  }

  /** Report what the provider answered (KeyBroker.ReportUsage); resolves to the key's health. */
  async reportUsage(leaseId, usage = {}) {
    const {
      httpStatus = 0, errorType = '', promptTokens, completionTokens, cost = 0, latencyMs,
      ratelimitLimit, ratelimitRemaining, ratelimitResetMs, model = '', retryAfterSeconds,
      errorReason = '', limitSource = '', upstreamProvider = '', resetsAt,
    } = usage;
    const request = {
      leaseId, httpStatus, errorType, cost, model, errorReason, limitSource, upstreamProvider,
      promptTokens: int64Field(promptTokens, 'promptTokens') ?? '0',
      completionTokens: int64Field(completionTokens, 'completionTokens') ?? '0',
      latencyMs: int64Field(latencyMs, 'latencyMs') ?? '0',
      retryAfter: toDuration(retryAfterSeconds),
    };
    if (resetsAt !== undefined && resetsAt !== null) {
      const ms = resetsAt instanceof Date ? resetsAt.getTime() : resetsAt * 1000;
      if (!Number.isFinite(ms) || ms < 0) throw new TypeError(`expected resetsAt as a Date or epoch seconds, got ${resetsAt}`);
      request.resetsAt = { seconds: String(Math.floor(ms / 1000)), nanos: Math.round((ms % 1000) * 1e6) };
    }
    // proto3 optional fields: only set when the provider sent the header.
    for (const [name, value] of [['ratelimitLimit', ratelimitLimit],
      ['ratelimitRemaining', ratelimitRemaining], ['ratelimitResetMs', ratelimitResetMs]]) {
      const v = int64Field(value, name);
      if (v !== undefined) request[name] = v;
    }
    const r = await this._call(this._broker, 'ReportUsage', request);
    return { health: enumName(r.health, 'KEY_HEALTH_'), cooldownUntil: toDate(r.cooldownUntil) };
  }

  /**
   * End a lease (KeyBroker.Complete). used=false (the call never went out) refunds its units.
   * @returns {Promise<{state: string, refunded: boolean}>}
   */
  async complete(leaseId, used = true) {
    const r = await this._call(this._broker, 'Complete', { leaseId, used: Boolean(used) });
    return { state: enumName(r.state, 'LEASE_STATE_'), refunded: r.refunded };
  }

  /**
   * One page of KeyAdmin.ListKeys: `{keys, nextPageToken}` (nextPageToken is '' on the
   * last page). pageSize 0 lets the broker choose (1,000; at most 10,000).
   */
  async listKeysPage({ pool = '', pageSize = 0, pageToken = '' } = {}) {
    const r = await this._call(this._admin, 'ListKeys', { pool, pageSize, pageToken });
    return { keys: r.keys.map(keyInfo), nextPageToken: r.nextPageToken };
  }

  /** Every key of KeyAdmin.ListKeys (never secrets), reading page after page. */
  async* iterKeys(pool = '', { pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this.listKeysPage({ pool, pageSize, pageToken });
      yield* page.keys;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** KeyAdmin.ListKeys: every key with usage and health (never secrets), all pages. */
  async listKeys(pool = '') {
    const keys = [];
    for await (const key of this.iterKeys(pool)) keys.push(key);
    return keys;
  }

  /** KeyAdmin.GetKey: one key by "<pool>/<name>". */
  async getKey(keyId) {
    const r = await this._call(this._admin, 'GetKey', { keyId });
    return keyInfo(r.key);
  }

  /** KeyAdmin.SetKeyEnabled: disable or re-enable a key; the reason goes to the audit trail. */
  async setKeyEnabled(keyId, enabled, reason = '') {
    const r = await this._call(this._admin, 'SetKeyEnabled', { keyId, enabled: Boolean(enabled), reason });
    return keyInfo(r.key);
  }

  /**
   * One page of KeyAdmin.GetUsage: `{rows, nextPageToken}` (nextPageToken is '' on the
   * last page). pageSize 0 lets the broker choose (1,000; at most lease.usage_max_rows).
   */
  async usagePage({ days = 7, groupBy = ['day'], pool = '', pageSize = 0, pageToken = '' } = {}) {
    const dims = groupBy.map((g) => {
      const name = `USAGE_DIMENSION_${String(g).toUpperCase()}`;
      if (!['day', 'key', 'account', 'model', 'principal'].includes(g)) {
        throw new RangeError(`unknown usage dimension ${g}`);
      }
      return name;
    });
    const r = await this._call(this._admin, 'GetUsage', {
      days, groupBy: dims, pool, pageSize, pageToken,
    });
    const rows = r.rows.map((row) => ({
      group: row.group,
      requests: int64Field(row.requests, 'requests'),
      failures: int64Field(row.failures, 'failures'),
      promptTokens: int64Field(row.promptTokens, 'promptTokens'),
      completionTokens: int64Field(row.completionTokens, 'completionTokens'),
      cost: row.cost,
      latencyMsAvg: row.latencyMsAvg,
      latencyMsP50: row.latencyMsP50,
      latencyMsP95: row.latencyMsP95,
      latencyMsP99: row.latencyMsP99,
    }));
    return { rows, nextPageToken: r.nextPageToken };
  }

  /** Every row of KeyAdmin.GetUsage, reading page after page. */
  async* iterUsage({ days = 7, groupBy = ['day'], pool = '', pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this.usagePage({ days, groupBy, pool, pageSize, pageToken });
      yield* page.rows;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /**
   * KeyAdmin.GetUsage, all pages: what ReportUsage recorded over the last `days` UTC days,
   * grouped by `groupBy` ('day', 'key', 'account', 'model', 'principal').
   */
  async usage(options = {}) {
    const rows = [];
    for await (const row of this.iterUsage(options)) rows.push(row);
    return rows;
  }

  /** KeyAdmin.ReloadKeys: re-read the key list from Vault now. */
  async reloadKeys() {
    return this._call(this._admin, 'ReloadKeys', {});
  }

  /**
   * Lease a key, run `fn(lease)`, and complete the lease, whichever way `fn` ends.
   *
   * When `fn` resolves, the lease completes with used=true. When it throws (or
   * rejects, with anything) before `lease.report()`/`lease.markUsed()`, the lease
   * completes with used=false, which refunds the units, and the error is re-thrown
   * (a failure to complete never hides it). Reports `fn` sent are let finish
   * first, so the broker has each report before the lease completes. A `fn` that
   * is not a function is refused before any lease is taken. An internal-route
   * answer is passed to `fn` and needs no completion. Resolves to what `fn`
   * resolves to.
   */
  async lease(options, fn) {
    if (typeof fn !== 'function') throw new TypeError('lease(options, fn): fn must be a function');
    const lease = await this.leaseKey(options);
    if (!lease.external) return fn(lease);
    let result;
    try {
      result = await fn(lease);
    } catch (err) {
      try {
        await Promise.allSettled(lease._reports);
        await this.complete(lease.leaseId, lease.used);
      } catch {
        // The lease then expires at its TTL; the caller's error matters more.
      }
      throw err;
    }
    await Promise.allSettled(lease._reports);
    await this.complete(lease.leaseId, true);
    return result;
  }
}

/**
 * What ReportUsage needs from an OpenRouter error answer (its JSON body, its headers as a
 * plain object or a fetch Headers): httpStatus, errorType, errorReason, limitSource,
 * upstreamProvider (a 429 with it cools the MODEL pool-wide, not the account), resetsAt,
 * retryAfterSeconds (header, else metadata.retry_after_seconds) and the X-RateLimit values.
 * Also reads an in-band stream error chunk ({error: {...}}, HTTP 200): report it as that error.
 */
function openRouterUsage(httpStatus, body = {}, headers = {}) {
  const get = (name) => (typeof headers.get === 'function' ? headers.get(name)
    : headers[name] ?? headers[name.toLowerCase()]);
  const err = body && typeof body.error === 'object' && body.error ? body.error : {};
  const meta = err.metadata && typeof err.metadata === 'object' ? err.metadata : {};
  const status = Number.isInteger(err.code) && httpStatus === 200 ? err.code : httpStatus;
  const usage = { httpStatus: status };
  const reason = typeof meta.reason === 'string' ? meta.reason : typeof err.code === 'string' ? err.code
    : ['in_flight_budget_exhausted', 'weight_exceeds_budget'].find((r) => String(err.message || '').includes(r)) || '';
  if (reason) usage.errorReason = reason;
  if (typeof meta.limit_source === 'string') usage.limitSource = meta.limit_source;
  if (typeof meta.provider_name === 'string') usage.upstreamProvider = meta.provider_name;
  if (typeof meta.error_type === 'string') usage.errorType = meta.error_type;
  if (meta.resets_at) {
    const t = typeof meta.resets_at === 'number' ? meta.resets_at * 1000 : Date.parse(meta.resets_at);
    if (Number.isFinite(t)) usage.resetsAt = new Date(t);
  }
  const metaHeaders = meta.headers && typeof meta.headers === 'object' ? meta.headers : {};
  const retry = get('retry-after') ?? meta.retry_after_seconds ?? metaHeaders['Retry-After'];
  if (retry !== undefined && retry !== null && Number.isFinite(Number(retry))) {
    usage.retryAfterSeconds = Math.max(0, Number(retry));
  }
  for (const [field, name] of [['ratelimitLimit', 'X-RateLimit-Limit'],
    ['ratelimitRemaining', 'X-RateLimit-Remaining'], ['ratelimitResetMs', 'X-RateLimit-Reset']]) {
    const v = get(name) ?? get(name.toLowerCase()) ?? metaHeaders[name];
    if (v !== undefined && v !== null && /^\d+$/.test(String(v))) usage[field] = String(v);
  }
  return usage;
}

module.exports = { KeyBrokerClient, Lease, openRouterUsage };

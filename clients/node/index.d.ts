// Type declarations for @keybroker/client (handwritten; the runtime loads the .proto).
// int64 fields are plain numbers: they are converted without loss or a RangeError
// is thrown (quota counts never come near 2^53).

import type { ChannelOptions } from '@grpc/grpc-js';

export type Priority = 'high' | 'normal' | 'low';
export type Route = 'external' | 'internal';
/** '' when the request was not routed internally. */
export type InternalReason =
  | ''
  | 'quota_exhausted'
  | 'reserved_for_higher_priority'
  | 'all_keys_unhealthy'
  | 'pacing'
  | 'model_cooling_down';
/** '' when the broker did not say. */
export type KeyHealth = '' | 'healthy' | 'cooling_down' | 'circuit_open' | 'disabled';
export type LeaseState = '' | 'active' | 'completed' | 'expired' | 'revoked';
/** An integer for an int64 field: a safe-integer number, a bigint or a decimal string. */
export type Int64Input = number | bigint | string;

export interface ClientOptions {
  /** Bearer token; omit when a client certificate names the principal. */
  token?: string;
  /** CA bundle (PEM contents as a Buffer, or a file path). Enables TLS. */
  rootCerts?: Buffer | string;
  /** Client certificate for mTLS (PEM Buffer or file path). Enables TLS. */
  clientCert?: Buffer | string;
  /** Private key of clientCert (PEM Buffer or file path). */
  clientKey?: Buffer | string;
  /** Deadline of every call in milliseconds; none by default. */
  timeoutMs?: number;
  /** grpc-js channel options. */
  channelOptions?: ChannelOptions;
}

export interface LeaseOptions {
  /** Pool to lease from. Required. */
  pool: string;
  /** Model the caller will request. */
  model?: string;
  /** Quota units to reserve (default 1). */
  units?: number;
  /** Default 'normal'. */
  priority?: Priority;
  /** Idempotency key: a retry with the same requestId returns the same lease. */
  requestId?: string;
  /** Lease time to live; default the broker's (60 s). */
  ttlSeconds?: number;
  /** Answer route 'internal' instead of throwing QuotaExhausted. */
  allowInternal?: boolean;
}

export interface Usage {
  /** HTTP status the provider answered; 0 when no response arrived. */
  httpStatus?: number;
  /** Short error class, e.g. "timeout", "rate_limit_exceeded". */
  errorType?: string;
  promptTokens?: Int64Input;
  completionTokens?: Int64Input;
  /** Cost in USD. */
  cost?: number;
  latencyMs?: Int64Input;
  /** X-RateLimit-Limit, when the provider sent it. */
  ratelimitLimit?: Int64Input;
  /** X-RateLimit-Remaining, when the provider sent it. */
  ratelimitRemaining?: Int64Input;
  /** X-RateLimit-Reset (epoch milliseconds), when the provider sent it. */
  ratelimitResetMs?: Int64Input;
  /** The model the provider actually used. */
  model?: string;
  /** Retry-After, when the provider sent it (or metadata.retry_after_seconds). */
  retryAfterSeconds?: number;
  /** The provider's error reason, e.g. "in_flight_budget_exhausted", "weight_exceeds_budget". */
  errorReason?: string;
  /** The error body's metadata.limit_source, e.g. "openrouter_key_limit". */
  limitSource?: string;
  /** metadata.provider_name when the error came from the upstream provider (a 429 with it
   * cools the model pool-wide, not the account). */
  upstreamProvider?: string;
  /** When a spent budget or credit limit resets (metadata.resets_at). */
  resetsAt?: Date | number;
}

/** The Usage fields of an OpenRouter error answer (or an in-band stream error chunk with
 * HTTP 200): status, reason, limit source, upstream provider, resets_at, Retry-After and
 * X-RateLimit values, read from the JSON body and the headers. */
export function openRouterUsage(httpStatus: number, body?: unknown,
  headers?: Record<string, string> | { get(name: string): string | null }): Usage;

export interface UsageResult {
  /** Health of the leased key after the report. */
  health: KeyHealth;
  /** When a cooldown ends (with 'cooling_down'). */
  cooldownUntil: Date | null;
}

export interface CompleteResult {
  state: LeaseState;
  /** Whether the units were refunded. */
  refunded: boolean;
}

export interface KeyInfo {
  keyId: string;
  pool: string;
  name: string;
  account: string;
  baseUrl: string;
  models: string[];
  enabled: boolean;
  health: KeyHealth;
  healthReason: string;
  cooldownUntil: Date | null;
  usedToday: number;
  accountDailyLimit: number;
  accountMinuteLimit: number;
  accountUsedToday: number;
  accountRemainingToday: number;
  keyDailyLimit: number;
  keyMinuteLimit: number;
  activeLeases: number;
  strategy: string;
}

export type UsageDimension = 'day' | 'key' | 'account' | 'model' | 'principal';

export interface UsageOptions {
  days?: number;
  groupBy?: UsageDimension[];
  pool?: string;
}

export interface PageOptions {
  /** Most items per page; 0 lets the broker choose. */
  pageSize?: number;
  /** A nextPageToken from the previous page; '' (default) for the first page. */
  pageToken?: string;
}

export interface ListKeysPageOptions extends PageOptions {
  pool?: string;
}

export interface KeysPage {
  keys: KeyInfo[];
  /** Token of the next page; '' on the last page. */
  nextPageToken: string;
}

export interface UsagePage {
  rows: UsageRow[];
  /** Token of the next page; '' on the last page. */
  nextPageToken: string;
}

export interface UsageRow {
  group: string[];
  requests: number;
  failures: number;
  promptTokens: number;
  completionTokens: number;
  cost: number;
  latencyMsAvg: number;
  latencyMsP50: number;
  latencyMsP95: number;
  latencyMsP99: number;
}

export interface ReloadResult {
  added: number;
  removed: number;
  updated: number;
  total: number;
}

/** One leased key (route 'external') or an internal-route answer. */
export class Lease {
  readonly leaseId: string;
  readonly keyId: string;
  /** The provider secret (not enumerable: stays out of JSON and console.log). */
  readonly apiKey: string;
  readonly baseUrl: string;
  readonly model: string;
  readonly account: string;
  readonly units: number;
  readonly expiresAt: Date | null;
  readonly resetsAt: Date | null;
  readonly remainingKeyToday: number;
  readonly remainingAccountToday: number;
  readonly route: Route;
  readonly internalReason: InternalReason;
  /** With route 'internal': seconds until a key is expected to be available. */
  readonly retryAfter: number;
  /** Whether the provider call went out (set by report() and markUsed()). */
  used: boolean;
  readonly external: boolean;
  markUsed(): void;
  /** Report the provider's answer; marks the lease used. */
  report(usage: Usage): Promise<UsageResult>;
}

export class KeyBrokerClient {
  constructor(target: string, options?: ClientOptions);
  close(): void;
  leaseKey(options: LeaseOptions): Promise<Lease>;
  renew(leaseId: string, ttlSeconds?: number): Promise<Date | null>;
  reportUsage(leaseId: string, usage: Usage): Promise<UsageResult>;
  complete(leaseId: string, used?: boolean): Promise<CompleteResult>;
  /** Every key, all pages. */
  listKeys(pool?: string): Promise<KeyInfo[]>;
  listKeysPage(options?: ListKeysPageOptions): Promise<KeysPage>;
  iterKeys(pool?: string, options?: { pageSize?: number }): AsyncGenerator<KeyInfo, void, undefined>;
  getKey(keyId: string): Promise<KeyInfo>;
  setKeyEnabled(keyId: string, enabled: boolean, reason?: string): Promise<KeyInfo>;
  reloadKeys(): Promise<ReloadResult>;
  /** Every row, all pages. */
  usage(options?: UsageOptions): Promise<UsageRow[]>;
  usagePage(options?: UsageOptions & PageOptions): Promise<UsagePage>;
  iterUsage(options?: UsageOptions & { pageSize?: number }): AsyncGenerator<UsageRow, void, undefined>;
  /**
   * Lease a key, run fn, complete the lease whichever way fn ends: used=true when fn
   * resolves, used=false (a refund) when fn throws before lease.report()/markUsed().
   * Reports fn sent finish before the lease completes; a fn that is not a function
   * throws TypeError before any lease is taken.
   */
  lease<T>(options: LeaseOptions, fn: (lease: Lease) => Promise<T> | T): Promise<T>;
}

/** Root of every error the client throws for a broker answer. */
export class BrokerError extends Error {
  /** gRPC status code (see grpc.status). */
  readonly code: number;
  /** gRPC status code name, e.g. "RESOURCE_EXHAUSTED". */
  readonly codeName: string;
  /** The ErrorInfo reason (e.g. "QUOTA_EXHAUSTED"), or "". */
  readonly reason: string;
}
export class InvalidArgument extends BrokerError {
  /** The rejected field, when the broker named it. */
  readonly field: string;
}
export class NotFound extends BrokerError {}
export class LeaseNotActive extends BrokerError {}
export class Unauthenticated extends BrokerError {}
export class PermissionDenied extends BrokerError {}
export class Unavailable extends BrokerError {}
export interface QuotaViolation {
  subject: string;
  description: string;
}
export class QuotaExhausted extends BrokerError {
  /** Seconds until the earliest key frees up (from google.rpc.RetryInfo). */
  readonly retryAfter: number;
  readonly violations: QuotaViolation[];
}

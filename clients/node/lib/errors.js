'use strict';
// Named errors for broker answers, mapped from the gRPC status in one place.
//
// The broker sends rich details as a google.rpc.Status in the
// `grpc-status-details-bin` trailer: ErrorInfo (reason), RetryInfo (how long to
// wait), QuotaFailure (which windows blocked) and BadRequest (which field).

const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const { durationSeconds } = require('./proto');

// The google.rpc messages the broker sends (fields as in googleapis'
// google/rpc/status.proto and error_details.proto; later fields are ignored).
const RPC = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { typeUrl: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            RetryInfo: { fields: { retryDelay: { type: 'google.protobuf.Duration', id: 1 } } },
            QuotaFailure: {
              fields: { violations: { rule: 'repeated', type: 'Violation', id: 1 } },
              nested: {
                Violation: {
                  fields: { subject: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
            BadRequest: {
              fields: { fieldViolations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
          },
        },
      },
    },
  },
});
const Status = RPC.lookupType('google.rpc.Status');
const DETAIL_TYPES = {
  'google.rpc.ErrorInfo': RPC.lookupType('google.rpc.ErrorInfo'),
  'google.rpc.RetryInfo': RPC.lookupType('google.rpc.RetryInfo'),
  'google.rpc.QuotaFailure': RPC.lookupType('google.rpc.QuotaFailure'),
  'google.rpc.BadRequest': RPC.lookupType('google.rpc.BadRequest'),
};
const TO_OBJECT = { longs: String, defaults: true };

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** Root of every error the client raises for a broker answer. */
class BrokerError extends Error {
  constructor(message, { code = grpc.status.UNKNOWN, reason = '' } = {}) {
    super(message);
    this.name = new.target.name;
    /** gRPC status code (a number, see grpc.status). */
    this.code = code;
    /** gRPC status code name, e.g. "RESOURCE_EXHAUSTED". */
    this.codeName = CODE_NAMES[code] || String(code);
    /** The ErrorInfo reason (e.g. "QUOTA_EXHAUSTED"), or "". */
    this.reason = reason;
  }
}

/** A request field was rejected; `field` names it when the broker said which. */
class InvalidArgument extends BrokerError {
  constructor(message, opts) {
    super(message, opts);
    this.field = '';
  }
}

/** Unknown pool, key or lease. */
class NotFound extends BrokerError {}

/** The lease expired or was completed, or its key was revoked. */
class LeaseNotActive extends BrokerError {}

/** No or bad credentials. */
class Unauthenticated extends BrokerError {}

/** The principal may not do this. */
class PermissionDenied extends BrokerError {}

/** The broker is not ready or a backend is down; safe to retry. */
class Unavailable extends BrokerError {}

/** No key can take the request now; `retryAfter` says when to try again (seconds). */
class QuotaExhausted extends BrokerError {
  constructor(message, opts) {
    super(message, opts);
    this.retryAfter = 0;
    this.violations = [];
  }
}

const BY_CODE = {
  [grpc.status.INVALID_ARGUMENT]: InvalidArgument,
  [grpc.status.NOT_FOUND]: NotFound,
  [grpc.status.FAILED_PRECONDITION]: LeaseNotActive,
  [grpc.status.UNAUTHENTICATED]: Unauthenticated,
  [grpc.status.PERMISSION_DENIED]: PermissionDenied,
  [grpc.status.RESOURCE_EXHAUSTED]: QuotaExhausted,
  [grpc.status.UNAVAILABLE]: Unavailable,
};

/** Decode a google.rpc.Status (bytes) into {code, message, details: [{type, value}]}. */
function decodeStatus(bytes) {
  const status = Status.toObject(Status.decode(bytes), TO_OBJECT);
  const details = [];
  for (const any of status.details) {
    const type = any.typeUrl.slice(any.typeUrl.lastIndexOf('/') + 1);
    const msg = DETAIL_TYPES[type];
    if (msg) details.push({ type, value: msg.toObject(msg.decode(any.value), TO_OBJECT) });
  }
  return { code: status.code, message: status.message, details };
}

/** The named error for a failed grpc-js call (a ServiceError). */
function fromServiceError(err) {
  if (err instanceof BrokerError) return err;
  const code = typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN;
  const Cls = BY_CODE[code] || BrokerError;
  const message = err.details || err.message || CODE_NAMES[code];
  const exc = new Cls(message, { code });
  const raw = err.metadata && typeof err.metadata.get === 'function'
    ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return exc;
  let status;
  try {
    status = decodeStatus(Buffer.from(raw[0]));
  } catch {
    return exc; // undecodable details: the code and message still stand
  }
  for (const { type, value } of status.details) {
    if (type === 'google.rpc.ErrorInfo') {
      exc.reason = value.reason;
    } else if (type === 'google.rpc.RetryInfo' && exc instanceof QuotaExhausted) {
      exc.retryAfter = durationSeconds(value.retryDelay);
    } else if (type === 'google.rpc.QuotaFailure' && exc instanceof QuotaExhausted) {
      for (const v of value.violations) exc.violations.push({ subject: v.subject, description: v.description });
    } else if (type === 'google.rpc.BadRequest' && exc instanceof InvalidArgument) {
      if (value.fieldViolations.length) exc.field = value.fieldViolations[0].field;
    }
  }
  return exc;
}

module.exports = {
  BrokerError,
  InvalidArgument,
  LeaseNotActive,
  NotFound,
  PermissionDenied,
  QuotaExhausted,
  Unauthenticated,
  Unavailable,
  decodeStatus,
  fromServiceError,
  RPC,
};

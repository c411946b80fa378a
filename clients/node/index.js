'use strict';
// @keybroker/client: lease API keys from a keybroker over gRPC.
//
//   const { KeyBrokerClient } = require('@keybroker/client');
//   const client = new KeyBrokerClient('127.0.0.1:50051', { token: process.env.KEYBROKER_TOKEN });
//   await client.lease({ pool: 'free', model: 'meta-llama/llama-3.3-70b-instruct:free' }, async (lease) => {
//     // call lease.baseUrl with lease.apiKey, then:
//     await lease.report({ httpStatus: 200, latencyMs: 420 });
//   });

const { KeyBrokerClient, Lease, openRouterUsage } = require('./lib/client');
const {
  BrokerError,
  InvalidArgument,
  LeaseNotActive,
  NotFound,
  PermissionDenied,
  QuotaExhausted,
  Unauthenticated,
  Unavailable,
} = require('./lib/errors');

module.exports = {
  BrokerError,
  InvalidArgument,
  KeyBrokerClient,
  Lease,
  LeaseNotActive,
  openRouterUsage,
  NotFound,
  PermissionDenied,
  QuotaExhausted,
  Unauthenticated,
  Unavailable,
};

// The iim plugin kit for JavaScript: error handling at the export boundary, host errors, and
// bytes <-> text.
//
// How componentize-js hands the WIT to JavaScript (see the kit's README for the whole table):
// a host call whose WIT result is `err` throws an Error whose own `payload` property is the
// `host-error` (`{tag: 'unavailable', val: '...'}`); an export's `err` is an Error with such a
// `payload` thrown from it, here a `plugin-error` (`{tag: 'rejected', val: '...'}`). Any other
// Error thrown from an export traps the instance: the host retries the event on a fresh
// instance and finally keeps it as a dead letter, with no reason. `plugin()` below turns such
// an Error into `failed(its message)` instead.

import { log } from 'iim:plugin/iim@0.1.2';

const PLUGIN_ERRORS = ['invalid-config', 'rejected', 'failed'];
const HOST_ERRORS = [
  'unknown-user',
  'unknown-server',
  'forged-sender',
  'unknown-message',
  'invalid-argument',
  'permission-denied',
  'limit-exceeded',
  'unavailable',
];

/** A `plugin-error` to throw from `init` or `handle`: `payload` is what the host gets. */
export class PluginError extends Error {
  constructor(tag, reason) {
    super(`${tag}: ${reason}`);
    this.name = 'PluginError';
    // An own property named `payload`: componentize-js returns it as the `err` case.
    this.payload = { tag, val: String(reason) };
  }
}

/** The event is refused on purpose: not retried. `throw rejected('...')`. */
export function rejected(reason) {
  return new PluginError('rejected', reason);
}

/** The plugin failed: the host retries the event, then keeps it as a dead letter. */
export function failed(reason) {
  return new PluginError('failed', reason);
}

/** From `init`: the configuration is not valid, and the plugin is not loaded. */
export function invalidConfig(reason) {
  return new PluginError('invalid-config', reason);
}

/**
 * The `host-error` a host call threw (`{tag: 'unknown-user', val: 'bob'}`), or undefined if
 * `e` is not one.
 */
export function hostError(e) {
  const payload = e !== null && typeof e === 'object' ? e.payload : undefined;
  if (payload && HOST_ERRORS.includes(payload.tag)) return payload;
  return undefined;
}

/** A `host-error` as text: `unknown-user(bob)`. */
export function describeHostError(err) {
  return `${err.tag}(${String(err.val)})`;
}

/**
 * Wraps the exported handler so that nothing thrown from `init` or `handle` traps:
 * a `PluginError` (or an `{tag, val}` plugin-error thrown as it is) is returned as it is; a
 * host error nobody caught becomes `failed('uncaught host error unavailable(...)')`; any other
 * exception becomes `failed(its message)`, with its stack written to the host's log.
 *
 *     export const handler = plugin({ init(config) { ... }, handle(event) { ... } });
 *
 * `init` and `handle` may also be async functions: the export waits for them.
 */
export function plugin({ init, handle }) {
  return {
    init: (config) => guard(() => init(config)),
    handle: (event) => guard(() => handle(event)),
  };
}

function guard(call) {
  let value;
  try {
    value = call();
  } catch (e) {
    return { tag: 'err', val: toPluginError(e) };
  }
  if (value !== null && typeof value === 'object' && typeof value.then === 'function') {
    return value.then(ok, (e) => ({ tag: 'err', val: toPluginError(e) }));
  }
  return ok(value);
}

// Always an explicit result: a value that looked like `{tag: 'ok' | 'err', ...}` would
// otherwise be taken for one.
function ok(value) {
  return { tag: 'ok', val: value };
}

function toPluginError(e) {
  const payload = e !== null && typeof e === 'object' ? e.payload : undefined;
  if (isPluginError(payload)) return payload;
  if (isPluginError(e)) return e;
  const host = hostError(e);
  if (host) return { tag: 'failed', val: `uncaught host error ${describeHostError(host)}` };
  let reason;
  if (isError(e)) {
    reason = e.name === 'Error' ? e.message : `${e.name}: ${e.message}`;
    try {
      log('error', `uncaught ${e.name}: ${e.message}\n${e.stack ?? ''}`);
    } catch {
      // The reason still reaches the host through `failed`.
    }
  } else {
    reason = `uncaught exception: ${String(e)}`;
  }
  return { tag: 'failed', val: reason };
}

// Errors thrown by the generated bindings (a bad `log` level, say) come from another realm:
// not `instanceof Error` here, but still errors.
function isError(e) {
  return e instanceof Error || Object.prototype.toString.call(e) === '[object Error]';
}

function isPluginError(v) {
  return (
    v !== null &&
    typeof v === 'object' &&
    PLUGIN_ERRORS.includes(v.tag) &&
    typeof v.val === 'string'
  );
}

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder('utf-8', { fatal: true });

/** A string as UTF-8 bytes, for a message body or a stored value. */
export function bytes(text) {
  return ENCODER.encode(text);
}

/** UTF-8 bytes as a string, or undefined if they are not valid UTF-8. */
export function text(bytes) {
  try {
    return DECODER.decode(bytes);
  } catch {
    return undefined;
  }
}

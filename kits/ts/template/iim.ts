// The iim plugin kit for TypeScript: error handling at the export boundary, host errors, and
// bytes <-> text.
//
// How componentize-js hands the WIT to JavaScript (see the kit's README for the whole table):
// a host call whose WIT result is `err` throws an Error whose own `payload` property is the
// `host-error` (`{tag: 'unavailable', val: '...'}`); an export's `err` is an Error with such a
// `payload` thrown from it, here a `plugin-error` (`{tag: 'rejected', val: '...'}`). Any other
// Error thrown from an export traps the instance: the host retries the event on a fresh
// instance and finally keeps it as a dead letter, with no reason. `plugin()` below turns such
// an Error into `failed(its message)` instead.
//
// The types of 'iim:plugin/*' come from the WIT: build.sh generates them into .types/.

import { log } from 'iim:plugin/iim@0.1.2';
import type {
  Event,
  HostError,
  PluginError as PluginErrorValue,
  PluginInfo,
} from 'iim:plugin/types@0.1.2';

const PLUGIN_ERRORS: readonly string[] = ['invalid-config', 'rejected', 'failed'];
const HOST_ERRORS: readonly string[] = [
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
  // An own property named `payload`: componentize-js returns it as the `err` case.
  readonly payload: PluginErrorValue;

  constructor(tag: PluginErrorValue['tag'], reason: string) {
    super(`${tag}: ${reason}`);
    this.name = 'PluginError';
    this.payload = { tag, val: reason };
  }
}

/** The event is refused on purpose: not retried. `throw rejected('...')`. */
export function rejected(reason: string): PluginError {
  return new PluginError('rejected', reason);
}

/** The plugin failed: the host retries the event, then keeps it as a dead letter. */
export function failed(reason: string): PluginError {
  return new PluginError('failed', reason);
}

/** From `init`: the configuration is not valid, and the plugin is not loaded. */
export function invalidConfig(reason: string): PluginError {
  return new PluginError('invalid-config', reason);
}

/**
 * The `host-error` a host call threw (`{tag: 'unknown-user', val: 'bob'}`), or undefined if
 * `e` is not one.
 */
export function hostError(e: unknown): HostError | undefined {
  const payload = payloadOf(e);
  if (isTagged(payload) && HOST_ERRORS.includes(payload.tag)) return payload as HostError;
  return undefined;
}

/** A `host-error` as text: `unknown-user(bob)`. */
export function describeHostError(err: HostError): string {
  return `${err.tag}(${String(err.val)})`;
}

/** What the plugin implements: `init` and `handle` of the WIT's `handler`, maybe async. */
export interface Handler {
  init(config: Array<[string, string]>): PluginInfo | Promise<PluginInfo>;
  handle(event: Event): void | Promise<void>;
}

/** The WIT result of an export, written out: what `plugin()`'s functions return. */
type Result<T> = { tag: 'ok'; val: T } | { tag: 'err'; val: PluginErrorValue };

/** The exported handler `plugin()` makes. */
export interface ExportedHandler {
  init(config: Array<[string, string]>): Result<PluginInfo> | Promise<Result<PluginInfo>>;
  handle(event: Event): Result<void> | Promise<Result<void>>;
}

/**
 * Wraps the exported handler so that nothing thrown from `init` or `handle` traps:
 * a `PluginError` (or an `{tag, val}` plugin-error thrown as it is) is returned as it is; a
 * host error nobody caught becomes `failed('uncaught host error unavailable(...)')`; any other
 * exception becomes `failed(its message)`, with its stack written to the host's log.
 *
 *     export const handler = plugin({ init(config) { ... }, handle(event) { ... } });
 */
export function plugin(impl: Handler): ExportedHandler {
  return {
    init: (config) => guard(() => impl.init(config)),
    handle: (event) => guard(() => impl.handle(event)),
  };
}

function guard<T>(call: () => T | Promise<T>): Result<T> | Promise<Result<T>> {
  let value: T | Promise<T>;
  try {
    value = call();
  } catch (e) {
    return { tag: 'err', val: toPluginError(e) };
  }
  if (value instanceof Promise) {
    return value.then(
      (v): Result<T> => ({ tag: 'ok', val: v }),
      (e): Result<T> => ({ tag: 'err', val: toPluginError(e) }),
    );
  }
  // Always an explicit result: a value that looked like `{tag: 'ok' | 'err', ...}` would
  // otherwise be taken for one.
  return { tag: 'ok', val: value };
}

function toPluginError(e: unknown): PluginErrorValue {
  const payload = payloadOf(e);
  if (isPluginError(payload)) return payload;
  if (isPluginError(e)) return e;
  const host = hostError(e);
  if (host) return { tag: 'failed', val: `uncaught host error ${describeHostError(host)}` };
  if (isError(e)) {
    try {
      log('error', `uncaught ${e.name}: ${e.message}\n${e.stack ?? ''}`);
    } catch {
      // The reason still reaches the host through `failed`.
    }
    return { tag: 'failed', val: e.name === 'Error' ? e.message : `${e.name}: ${e.message}` };
  }
  return { tag: 'failed', val: `uncaught exception: ${String(e)}` };
}

// Errors thrown by the generated bindings (a bad `log` level, say) come from another realm:
// not `instanceof Error` here, but still errors.
function isError(e: unknown): e is Error {
  return e instanceof Error || Object.prototype.toString.call(e) === '[object Error]';
}

function payloadOf(e: unknown): unknown {
  return e !== null && typeof e === 'object' && 'payload' in e ? e.payload : undefined;
}

function isTagged(v: unknown): v is { tag: string; val?: unknown } {
  return v !== null && typeof v === 'object' && 'tag' in v && typeof v.tag === 'string';
}

function isPluginError(v: unknown): v is PluginErrorValue {
  return isTagged(v) && PLUGIN_ERRORS.includes(v.tag) && typeof v.val === 'string';
}

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder('utf-8', { fatal: true });

/** A string as UTF-8 bytes, for a message body or a stored value. */
export function bytes(text: string): Uint8Array {
  return ENCODER.encode(text);
}

/** UTF-8 bytes as a string, or undefined if they are not valid UTF-8. */
export function text(bytes: Uint8Array): string | undefined {
  try {
    return DECODER.decode(bytes);
  } catch {
    return undefined;
  }
}

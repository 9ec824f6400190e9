// The `typing` plugin of iim, in JavaScript: passes "user is typing" indicators on.
//
// Configuration (typing.toml): `max_body`, the largest body accepted in bytes (1 to 65536,
// default 64); `kind`, the custom message kind it handles (default `typing`).
//
// `./iim.js` is the kit's helper, kits/js/template/iim.js: build.sh builds this file in a
// project made as `iim-host plugin new typing --lang js` makes one, where it is beside it.

import { passOn, log } from 'iim:plugin/iim@0.1.2';
import {
  plugin,
  rejected,
  failed,
  invalidConfig,
  hostError,
  describeHostError,
  text,
} from './iim.js';

const DEFAULT_MAX_BODY = 64;
const MAX_BODY_LIMIT = 65536;
const DEFAULT_KIND = 'typing';

// Per instance: `init` runs once on each new instance, before any event.
let maxBody = DEFAULT_MAX_BODY;
let kind = DEFAULT_KIND;

function parseMaxBody(value) {
  // Number() also takes ' 5', '0x10', '1e3': plain digits only.
  if (!/^[0-9]+$/.test(value)) {
    throw invalidConfig(`max_body must be a whole number, got ${JSON.stringify(value)}`);
  }
  const n = Number(value);
  if (n < 1 || n > MAX_BODY_LIMIT) {
    throw invalidConfig(`max_body must be between 1 and ${MAX_BODY_LIMIT}, got ${value}`);
  }
  return n;
}

function parseKind(value) {
  if (!/^[a-z0-9._-]{1,64}$/.test(value)) {
    throw invalidConfig(
      `kind must be 1 to 64 bytes of a-z 0-9 . _ -, got ${JSON.stringify(value)}`,
    );
  }
  return value;
}

// A host error from `call` as the plugin error `handle` ends with.
function hostFailure(call, e) {
  const err = hostError(e);
  if (err === undefined) return e;
  const reason = `${call}: ${describeHostError(err)}`;
  // `unavailable` is the host's own trouble: worth a retry. Anything else is final.
  return err.tag === 'unavailable' ? failed(reason) : rejected(reason);
}

function forward(msg) {
  const size = msg.body.length;
  if (size > maxBody) {
    throw rejected(`typing body is ${size} bytes, more than the ${maxBody} allowed`);
  }
  const state = text(msg.body);
  if (state === undefined) {
    throw rejected('typing body is not UTF-8');
  }

  // The addressees, less the sender, each once, in order.
  const recipients = [...new Set(msg.to)].filter((user) => user !== msg.sender);
  let sent = 0;
  if (recipients.length > 0) {
    try {
      // The message being handled, unchanged (same id): the host passes it on.
      sent = passOn(recipients);
    } catch (e) {
      throw hostFailure('pass-on', e);
    }
  }
  log(
    'debug',
    `typing ${JSON.stringify(state)} from ${msg.sender}/${msg.senderDevice} ` +
      `(message ${msg.id}) sent to ${sent} of ${recipients.length} user(s)`,
  );
}

export const handler = plugin({
  init(config) {
    const seen = new Set();
    let newMaxBody = DEFAULT_MAX_BODY;
    let newKind = DEFAULT_KIND;
    for (const [key, value] of config) {
      if (seen.has(key)) throw invalidConfig(`${key} is given more than once`);
      seen.add(key);
      if (key === 'max_body') {
        newMaxBody = parseMaxBody(value);
      } else if (key === 'kind') {
        newKind = parseKind(value);
      } else {
        throw invalidConfig(`unknown configuration key ${JSON.stringify(key)}`);
      }
    }
    maxBody = newMaxBody;
    kind = newKind;
    return {
      name: 'typing',
      version: '0.1.0',
      subscriptions: [{ tag: 'message', val: { tag: 'custom', val: kind } }],
    };
  },

  handle(event) {
    if (event.tag === 'message') {
      const k = event.val.kind;
      if (k.tag === 'custom' && k.val === kind) {
        forward(event.val);
        return;
      }
    }
    throw rejected(`typing handles only messages of kind ${kind}`);
  },
});

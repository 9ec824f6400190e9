// The {{name}} plugin of iim. Build it with `bash build.sh` (or `npm run build`).
//
// It handles messages of the custom kind `{{name}}` and passes each one on, unchanged, to its
// addressees other than the sender.

import { passOn, log } from 'iim:plugin/iim@0.1.2';
import type { Event, PluginInfo } from 'iim:plugin/types@0.1.2';
import { plugin, rejected, failed, invalidConfig, hostError, describeHostError } from './iim.js';

const KIND = '{{name}}';

export const handler = plugin({
  // Called once on each new instance, with the `key = "value"` pairs of {{name}}.toml.
  init(config: Array<[string, string]>): PluginInfo {
    for (const [key] of config) {
      throw invalidConfig(`unknown configuration key ${JSON.stringify(key)}`);
    }
    return {
      name: '{{name}}',
      version: '0.1.0',
      subscriptions: [{ tag: 'message', val: { tag: 'custom', val: KIND } }],
    };
  },

  handle(event: Event): void {
    if (event.tag !== 'message') {
      throw rejected(`{{name}} handles only messages, not ${event.tag}`);
    }
    const msg = event.val;
    const to = [...new Set(msg.to)].filter((user) => user !== msg.sender);
    if (to.length === 0) return;
    let sent: number;
    try {
      // The message being handled, unchanged (same id): the host passes it on rather than
      // making a new one, and neither it nor a user-list crosses back.
      sent = passOn(to);
    } catch (e) {
      const err = hostError(e);
      if (err === undefined) throw e;
      const reason = `cannot pass message ${msg.id} on: ${describeHostError(err)}`;
      // `unavailable` is the host's own trouble: worth a retry. Anything else is final.
      throw err.tag === 'unavailable' ? failed(reason) : rejected(reason);
    }
    log('debug', `message ${msg.id} from ${msg.sender} passed on to ${sent} user(s)`);
  },
});

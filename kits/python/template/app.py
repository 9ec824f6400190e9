"""The iim plugin `{{name}}`: passes each message of kind `{{name}}` on to its addressees.

`bash build.sh` makes `{{name}}.wasm` of this module and the others beside it.
componentize-py generates the `wit_world` package from `wit/iim.wit`: the host's functions
are in `wit_world.imports.iim`, its types in `wit_world.imports.types`. The class `Handler`
below is the exported handler; `iim_plugin` (beside this file) turns its errors into the
host's.
"""

from typing import List, Tuple

from componentize_py_types import Err
from wit_world.imports import iim
from wit_world.imports.types import (
    Event,
    Event_Message,
    LogLevel,
    MessageKind_Custom,
    PluginInfo,
    Subscription_Message,
)

from iim_plugin import Plugin, host_failure, read_config, rejected

NAME = "{{name}}"
VERSION = "0.1.0"
KIND = NAME


class Handler(Plugin):
    def init(self, config: List[Tuple[str, str]]) -> PluginInfo:
        # Called once on each new instance. No keys: any key in {{name}}.toml is refused.
        read_config(config, keys=())
        return PluginInfo(
            name=NAME,
            version=VERSION,
            subscriptions=[Subscription_Message(MessageKind_Custom(KIND))],
        )

    def handle(self, event: Event) -> None:
        if not isinstance(event, Event_Message):
            rejected(f"{NAME} handles only messages of kind {KIND}")
        msg = event.value
        # The addressees less the sender, each once, in order.
        to = [user for user in dict.fromkeys(msg.to) if user != msg.sender]
        if not to:
            return
        try:
            # The message being handled, unchanged (same id): the host passes it on, and
            # neither it nor a user-list crosses back.
            sent = iim.pass_on(to)
        except Err as e:
            host_failure("pass-on", e.value)
        iim.log(LogLevel.DEBUG, f"message {msg.id} from {msg.sender} sent to {sent} user(s)")

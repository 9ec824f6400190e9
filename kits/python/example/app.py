"""The `typing` plugin of iim, in Python: forwards "user is typing" indicators.

Built by build.sh into `typing.wasm` with the kit's `iim_plugin` module
(`kits/python/template/iim_plugin.py`). Configuration (`typing.toml`):

- `max_body`: the largest body accepted, in bytes: plain digits, 1 to 65536; default 64.
- `kind`: the custom message kind it handles: 1 to 64 bytes of `a-z 0-9 . _ -`; default
  `typing`.
"""

from typing import List, Tuple

from componentize_py_types import Err
from wit_world.imports import iim
from wit_world.imports.types import (
    Event,
    Event_Message,
    LogLevel,
    Message,
    MessageKind_Custom,
    PluginInfo,
    Subscription_Message,
)

from iim_plugin import Plugin, body_text, host_failure, invalid_config, read_config, rejected

NAME = "typing"
VERSION = "0.1.0"

DEFAULT_MAX_BODY = 64
# The largest `max_body` the configuration may ask for.
MAX_BODY_LIMIT = 65536
DEFAULT_KIND = "typing"
KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")

# Set by `init`, which runs once on each new instance before any event. Module variables,
# not attributes of the Handler: componentize-py calls `init` and `handle` on different
# Handler objects.
_max_body: int = DEFAULT_MAX_BODY
_kind: str = DEFAULT_KIND


def _parse_max_body(value: str) -> int:
    # int() also takes " 5", "+5", "1_000" and other spellings: plain digits only.
    if not (value.isascii() and value.isdigit()):
        invalid_config(f"max_body must be a whole number, got {value!r}")
    n = int(value)
    if not 1 <= n <= MAX_BODY_LIMIT:
        invalid_config(f"max_body must be between 1 and {MAX_BODY_LIMIT}, got {n}")
    return n


def _parse_kind(value: str) -> str:
    if not (1 <= len(value) <= 64 and set(value) <= KIND_CHARS):
        invalid_config(f"kind must be 1 to 64 bytes of a-z 0-9 . _ -, got {value!r}")
    return value


def _forward(msg: Message) -> None:
    size = len(msg.body)
    if size > _max_body:
        rejected(f"typing body is {size} bytes, more than the {_max_body} allowed")
    state = body_text(msg, "typing body")

    # The addressees less the sender, each once, in order.
    recipients = [user for user in dict.fromkeys(msg.to) if user != msg.sender]
    sent = 0
    if recipients:
        try:
            # The message being handled, unchanged (same id): the host passes it on.
            sent = iim.pass_on(recipients)
        except Err as e:
            host_failure("pass-on", e.value)

    iim.log(
        LogLevel.DEBUG,
        f"{_kind} {state!r} from {msg.sender}/{msg.sender_device} (message {msg.id}) "
        f"sent to {sent} of {len(recipients)} user(s)",
    )


class Handler(Plugin):
    """The exported `handler` interface."""

    def init(self, config: List[Tuple[str, str]]) -> PluginInfo:
        global _max_body, _kind
        given = read_config(config, keys=("max_body", "kind"))
        _max_body = _parse_max_body(given.get("max_body", str(DEFAULT_MAX_BODY)))
        _kind = _parse_kind(given.get("kind", DEFAULT_KIND))
        return PluginInfo(
            name=NAME,
            version=VERSION,
            subscriptions=[Subscription_Message(MessageKind_Custom(_kind))],
        )

    def handle(self, event: Event) -> None:
        if isinstance(event, Event_Message):
            kind = event.value.kind
            if isinstance(kind, MessageKind_Custom) and kind.value == _kind:
                _forward(event.value)
                return
        rejected(f"typing handles only messages of kind {_kind}")

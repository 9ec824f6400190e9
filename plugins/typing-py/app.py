"""The `typing` plugin of iim, in Python: forwards "user is typing" indicators.

Built into a WebAssembly component by componentize-py against the `plugin` world of
`wit/iim.wit` (see build.sh). componentize-py generates the `wit_world` package from the WIT:

- `wit_world.imports.iim`: the host's functions (`resolve`, `send`, `log`, ...). A WIT
  `result<T, host-error>` comes back as `T`; the `err` case is raised as
  `componentize_py_types.Err(HostError_...)`.
- `wit_world.imports.types`: records as dataclasses (`Message`, `UserList`, ...), variants as
  one dataclass per case (`MessageKind_Custom(value)`, `Event_Message(value)`, ...), enums as
  `Enum`s (`LogLevel.DEBUG`).
- `wit_world.exports.Handler`: the protocol the exported `handler` interface is implemented
  by; the class must be called `Handler` and live in this module (`app`). Returning a value is
  `ok`; raising `Err(PluginError_...)` is `err`.
"""

from typing import List, Optional, Tuple

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import iim
from wit_world.imports.types import (
    Event,
    Event_Message,
    HostError,
    HostError_Unavailable,
    LogLevel,
    Message,
    MessageKind_Custom,
    PluginError,
    PluginError_Failed,
    PluginError_InvalidConfig,
    PluginError_Rejected,
    PluginInfo,
    Subscription_Message,
)

NAME = "typing"
VERSION = "0.1.0"
KIND = "typing"

DEFAULT_MAX_BODY = 64
# The largest `max_body` the configuration may ask for.
MAX_BODY_LIMIT = 65536

# Per instance: `init` runs once on each new instance, before any event.
_max_body: int = DEFAULT_MAX_BODY


def _parse_max_body(value: str) -> int:
    text = value.strip()
    # int() also takes "+5", "1_000" and other spellings: accept plain digits only.
    if not text.isascii() or not text.isdigit():
        raise Err(PluginError_InvalidConfig(f"max_body must be a whole number, got {value!r}"))
    n = int(text)
    if not 1 <= n <= MAX_BODY_LIMIT:
        raise Err(
            PluginError_InvalidConfig(
                f"max_body must be between 1 and {MAX_BODY_LIMIT}, got {n}"
            )
        )
    return n


def _host_failure(what: str, e: HostError) -> Err[PluginError]:
    """Turns a host error into the plugin error `handle` returns."""
    detail = f"{what}: {type(e).__name__.removeprefix('HostError_')}({e.value!r})"
    if isinstance(e, HostError_Unavailable):
        # The host could not complete the call: let the event be retried.
        return Err(PluginError_Failed(detail))
    return Err(PluginError_Rejected(detail))


def _forward(msg: Message) -> None:
    body = msg.body
    if len(body) > _max_body:
        raise Err(
            PluginError_Rejected(
                f"typing body is {len(body)} bytes, more than the {_max_body} allowed"
            )
        )
    try:
        state = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Err(PluginError_Rejected("typing body is not valid UTF-8")) from None

    # The addressees, less the sender, each once, in order.
    recipients: List[str] = []
    for user in msg.to:
        if user != msg.sender and user not in recipients:
            recipients.append(user)

    sent = 0
    if recipients:
        try:
            users = iim.resolve(recipients)
        except Err as e:
            raise _host_failure("resolve", e.value) from None
        try:
            # Forward the message itself: same record, same id.
            sent = iim.send(msg, users)
        except Err as e:
            raise _host_failure("send", e.value) from None

    iim.log(
        LogLevel.DEBUG,
        f"typing {state!r} from {msg.sender}/{msg.sender_device} (message {msg.id}) "
        f"sent to {sent} of {len(recipients)} user(s)",
    )


class Handler(exports.Handler):
    """The exported `handler` interface."""

    def init(self, config: List[Tuple[str, str]]) -> PluginInfo:
        global _max_body
        max_body: Optional[int] = None
        for key, value in config:
            if key == "max_body":
                if max_body is not None:
                    raise Err(PluginError_InvalidConfig("max_body is given more than once"))
                max_body = _parse_max_body(value)
            else:
                raise Err(PluginError_InvalidConfig(f"unknown configuration key {key!r}"))
        _max_body = DEFAULT_MAX_BODY if max_body is None else max_body
        return PluginInfo(
            name=NAME,
            version=VERSION,
            subscriptions=[Subscription_Message(MessageKind_Custom(KIND))],
        )

    def handle(self, event: Event) -> None:
        if isinstance(event, Event_Message):
            kind = event.value.kind
            if isinstance(kind, MessageKind_Custom) and kind.value == KIND:
                _forward(event.value)
                return
        raise Err(PluginError_Rejected(f"the typing plugin does not handle {event!r}"))

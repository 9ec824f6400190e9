"""The Python side of an iim plugin: its errors, without traps, and small helpers.

An exported call (`init`, `handle`) answers `err(plugin-error)` by raising
`componentize_py_types.Err(PluginError_...)`; `rejected`, `failed` and `invalid_config` raise
it for you. Any other exception that escapes a call would trap the instance: the host would
throw the instance away, make a new one and retry, and in the end keep the event with no
reason better than "trapped". Make the app's `Handler` a subclass of `Plugin` and such an
exception becomes `failed("<ExceptionType>: <message>")` instead, its traceback goes to the
host's log, and the instance lives on.
"""

import functools
import re
import sys
import traceback
from typing import Callable, Collection, Dict, List, NoReturn, Tuple, TypeVar, get_args

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    HostError,
    HostError_Unavailable,
    Message,
    PluginError,
    PluginError_Failed,
    PluginError_InvalidConfig,
    PluginError_Rejected,
    PluginInfo,
)

__all__ = [
    "Plugin",
    "body_text",
    "describe",
    "failed",
    "host_failure",
    "invalid_config",
    "read_config",
    "rejected",
]


def rejected(reason: str) -> NoReturn:
    """Refuses the event on purpose: the host logs the reason and does not retry it."""
    raise Err(PluginError_Rejected(reason))


def failed(reason: str) -> NoReturn:
    """Fails the event: the host retries it, then keeps it as a dead letter with `reason`."""
    raise Err(PluginError_Failed(reason))


def invalid_config(reason: str) -> NoReturn:
    """From `init`: the configuration is not valid, and the host does not load the plugin."""
    raise Err(PluginError_InvalidConfig(reason))


def describe(error: object) -> str:
    """A WIT variant case as WIT writes it: `unavailable('store busy')`, `rejected('...')`."""
    case = type(error).__name__.split("_", 1)[-1]
    case = re.sub(r"(?<!^)(?=[A-Z])", "-", case).lower()
    if hasattr(error, "value"):
        return f"{case}({error.value!r})"
    return case


def host_failure(what: str, error: HostError) -> NoReturn:
    """Fails or refuses the event after the host call `what` returned `error`.

    `unavailable` (the host could not complete the call) is `failed`, so that the event is
    retried; any other host error says the request itself is wrong, and is `rejected`.
    """
    reason = f"{what}: {describe(error)}"
    if isinstance(error, HostError_Unavailable):
        failed(reason)
    rejected(reason)


def body_text(message: Message, what: str = "the body") -> str:
    """The message's body as text, or `rejected("<what> is not UTF-8")`."""
    try:
        return message.body.decode("utf-8")
    except UnicodeDecodeError:
        rejected(f"{what} is not UTF-8")


def read_config(config: List[Tuple[str, str]], keys: Collection[str]) -> Dict[str, str]:
    """The configuration `init` was given, as a dict, checked against the `keys` it may have.

    An unknown key, or a key given twice, is `invalid_config` naming the key.
    """
    found: Dict[str, str] = {}
    for key, value in config:
        if key not in keys:
            invalid_config(f"unknown configuration key {key!r}")
        if key in found:
            invalid_config(f"{key} is given more than once")
        found[key] = value
    return found


_PLUGIN_ERRORS = get_args(PluginError)
_HOST_ERRORS = get_args(HostError)
_F = TypeVar("_F", bound=Callable)


def _host_call(e: BaseException) -> str:
    """The host function an exception came out of, if it came out of one."""
    name = "a host call"
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("wit_world.imports."):
            name = tb.tb_frame.f_code.co_name
            break
        tb = tb.tb_next
    return name


def _guarded(call: _F, result_type: type) -> _F:
    """`call`, with any exception other than a plugin error turned into `failed`, and a result
    that is not a `result_type` too (it would trap when the host reads it)."""

    @functools.wraps(call)
    def guarded(*args):
        try:
            result = call(*args)
        except Err as e:
            if isinstance(e.value, _PLUGIN_ERRORS):
                raise
            error: BaseException = e
            if isinstance(e.value, _HOST_ERRORS):
                reason = f"uncaught host error from {_host_call(e)}: {describe(e.value)}"
            else:
                reason = f"uncaught Err({e.value!r})"
        except BaseException as e:
            error = e
            text = str(e)
            reason = f"{type(e).__name__}: {text}" if text else type(e).__name__
        else:
            if isinstance(result, result_type):
                return result
            failed(
                f"{call.__name__} returned {type(result).__name__}, not {result_type.__name__}"
            )
        # The traceback goes to the host's log, from the app's frame on (not this one); the
        # Err is raised out of the except blocks, so that it has no exception chained to it.
        trace = error.__traceback__.tb_next if error.__traceback__ else None
        traceback.print_exception(type(error), error, trace, file=sys.stderr)
        failed(reason)

    return guarded  # type: ignore[return-value]


class Plugin(exports.Handler):
    """The base of the app's `Handler`: guards its `init` and `handle`.

    An exception escaping either, other than `Err(PluginError_...)`, becomes
    `failed("<ExceptionType>: <message>")`; an uncaught host error becomes
    `failed("uncaught host error from <call>: <error>")`; an `init` that returns something
    other than a `PluginInfo` (a forgotten `return`) becomes `failed` too.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # `handle` may return anything: componentize-py ignores it.
        for name, result_type in (("init", PluginInfo), ("handle", object)):
            if name in cls.__dict__:
                setattr(cls, name, _guarded(cls.__dict__[name], result_type))

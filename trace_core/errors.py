"""One base class for errors a user can cause.

    raise TraceError("allocation.root_strategy", "'mine' is not one of the registered root strategies: ...")
    -> str(err) == "allocation.root_strategy: 'mine' is not one of ...", err.field == "allocation.root_strategy"

Subclasses say where the error comes from: ConfigError (trace_core.train.config_loader), ForestError
(trace_core.forest), EnvError (trace_core.envs.base), AllocationError (trace_core.allocation). Every one is a
ValueError, so `except ValueError` keeps catching them.
"""

from __future__ import annotations

import re

# a field as the one-argument form spells it before ": " (a dotted key, an index, a flag: no spaces or quotes)
_FIELD_PREFIX = re.compile(r"^([A-Za-z_\-][\w.\-\[\]/]*): (.*)\Z", re.DOTALL)


class TraceError(ValueError):
    """A problem a user can fix. `field` names the offending field or config key, `detail` says what is wrong.

    TraceError(field, message): the text is f"{field}: {message}", or the message alone when it already begins
    with the field's name (e.g. ("budget", "budget=9 cannot be spent ...")).
    TraceError(text) (the older one-argument form): the field is read from the text before the first ": " when
    that looks like a field name, else it is "" (the text is kept as given).
    """

    def __init__(self, field: str, message: str | None = None):
        if message is None:
            text = str(field)
            match = _FIELD_PREFIX.match(text)
            field, message = (match.group(1), match.group(2)) if match else ("", text)
        else:
            field, message = str(field), str(message)
            text = message if not field or _names(message, field) else f"{field}: {message}"
        super().__init__(text)
        self.field = field
        self.detail = message

    def under(self, prefix: str) -> TraceError:
        """The same error with its field qualified by where it came from (e.g. "allocation" + "mode")."""
        return type(self)(f"{prefix}.{self.field}" if self.field else prefix, self.detail)

    def __reduce__(self):  # pickles through (field, detail), the constructor every subclass keeps
        return type(self), (self.field, self.detail)


def _names(message: str, field: str) -> bool:
    """Whether `message` starts with the field's name as a word (then prefixing it again would repeat it)."""
    return message.startswith(field) and (
        len(message) == len(field) or not (message[len(field)].isalnum() or message[len(field)] in "_.")
    )


__all__ = ["TraceError"]

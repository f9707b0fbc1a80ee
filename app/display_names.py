"""Names a client gives its uploads, made safe to store and to show.

A name is for display only, so control characters (NUL, which PostgreSQL cannot
store, line feeds, which cannot go into a header) are dropped rather than
refused; a name must then fit its column. A file name too long is shortened
keeping its extension, since the client did not choose it for this service.
"""

from __future__ import annotations

import unicodedata

#: Characters a ``name`` or file name may hold: the columns are ``String(255)``.
MAX_NAME_CHARS = 255
#: Unicode categories dropped from names: controls, format characters, surrogates,
#: unassigned code points, and the line and paragraph separators.
_DROPPED = frozenset({"Cc", "Cf", "Cs", "Cn", "Zl", "Zp"})


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a character :func:`display_name` would drop."""
    return any(unicodedata.category(c) in _DROPPED for c in text)


def display_name(text: str) -> str:
    """``text`` without control characters and surrounding white space."""
    return "".join(c for c in text if unicodedata.category(c) not in _DROPPED).strip()


def file_display_name(filename: str) -> str:
    """A client's file name as stored: :func:`display_name`, cut to :data:`MAX_NAME_CHARS`
    keeping the extension (up to 16 characters of it)."""
    name = display_name(filename)
    if len(name) <= MAX_NAME_CHARS:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix) > 16:
        return name[:MAX_NAME_CHARS]
    return stem[: MAX_NAME_CHARS - len(suffix) - 1] + "." + suffix

"""Channel kinds and channel-name rules.

Kinds are decided by prefix, most specific first (Pusher channel types). Names may hold only
``[-a-zA-Z0-9_=@,.;]`` and be at most the app's ``max_channel_name_length`` long; the
only ``#`` name is the reserved ``#server-to-user-{user_id}`` bound by sign-in.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

USER_CHANNEL_PREFIX = "#server-to-user-"
_NAME_RE = re.compile(r"[-a-zA-Z0-9_=@,.;]+")


@dataclass(frozen=True, slots=True)
class ChannelKind:
    """What a channel name implies: who may join and what it does."""

    name: str
    private: bool = False  # subscription signed over socket_id:channel
    presence: bool = False  # signed with channel_data; roster and member events
    encrypted: bool = False  # end-to-end encrypted; no client events
    cache: bool = False  # last API event replayed to new subscribers
    user: bool = False  # #server-to-user-{id}

    @property
    def needs_auth(self) -> bool:
        return self.private or self.presence

    @property
    def client_events(self) -> bool:
        """Client events are allowed on private and presence channels, never encrypted."""
        return (self.private or self.presence) and not self.encrypted


class Kinds(enum.Enum):
    """The channel kinds, in prefix-matching order."""

    PRIVATE_ENCRYPTED_CACHE = ChannelKind("private-encrypted-cache", private=True,
                                          encrypted=True, cache=True)
    PRIVATE_ENCRYPTED = ChannelKind("private-encrypted", private=True, encrypted=True)
    PRIVATE_CACHE = ChannelKind("private-cache", private=True, cache=True)
    PRESENCE_CACHE = ChannelKind("presence-cache", presence=True, cache=True)
    CACHE = ChannelKind("cache", cache=True)
    PRIVATE = ChannelKind("private", private=True)
    PRESENCE = ChannelKind("presence", presence=True)
    USER = ChannelKind("server-to-user", user=True)
    PUBLIC = ChannelKind("public")


_PREFIXES: tuple[tuple[str, ChannelKind], ...] = (
    ("private-encrypted-cache-", Kinds.PRIVATE_ENCRYPTED_CACHE.value),
    ("private-encrypted-", Kinds.PRIVATE_ENCRYPTED.value),
    ("private-cache-", Kinds.PRIVATE_CACHE.value),
    ("presence-cache-", Kinds.PRESENCE_CACHE.value),
    ("cache-", Kinds.CACHE.value),
    ("private-", Kinds.PRIVATE.value),
    ("presence-", Kinds.PRESENCE.value),
    (USER_CHANNEL_PREFIX, Kinds.USER.value),
)


#: the prefixes by their first character: most channels (every public one) are told
#: apart by one dict lookup instead of eight ``startswith`` calls
_BY_FIRST: dict[str, tuple[tuple[str, ChannelKind], ...]] = {
    first: tuple(entry for entry in _PREFIXES if entry[0][0] == first)
    for first in {prefix[0] for prefix, _ in _PREFIXES}
}
_PUBLIC = Kinds.PUBLIC.value


def kind_of(channel: str) -> ChannelKind:
    """The kind of ``channel``, by the most specific matching prefix."""
    candidates = _BY_FIRST.get(channel[:1])
    if candidates is not None:
        for prefix, kind in candidates:
            if channel.startswith(prefix):
                return kind
    return _PUBLIC


def name_problem(channel: object, max_length: int) -> str | None:
    """Why ``channel`` is not a valid channel name, or ``None`` if it is."""
    if not isinstance(channel, str) or not channel:
        return "The channel name must be a non-empty string."
    if len(channel) > max_length:
        return f"The channel name is longer than the allowed {max_length} characters."
    name = channel
    if channel.startswith(USER_CHANNEL_PREFIX):
        name = channel[len(USER_CHANNEL_PREFIX):]
    if not _NAME_RE.fullmatch(name):
        return (
            f"The channel name {channel!r} is not allowed: use only letters, digits "
            "and - _ = @ , . ;"
        )
    return None


def user_channel(user_id: str) -> str:
    """The per-user channel a signed-in connection receives server-to-user events on."""
    return f"{USER_CHANNEL_PREFIX}{user_id}"

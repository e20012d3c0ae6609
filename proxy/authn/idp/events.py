"""Audit-worthy events of the identity provider, and the sink they are handed to.

Every login, refresh and logout, failed or not, produces one `AuthEvent`. The lead connects
an `AuthEventSink` to the audit log; tests collect events in a list. Events carry no
secrets: never a password, never a token, only the family id that names a login session.
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import msgspec

log = logging.getLogger(__name__)

AuthEventKind = Literal[
    "login_succeeded",
    "login_failed",
    "login_rate_limited",
    "refresh_succeeded",
    "refresh_failed",
    "refresh_reuse_detected",
    "logout",
]

# Hostile usernames can be arbitrarily long; the audit trail keeps a bounded prefix.
MAX_EVENT_USERNAME_CHARS = 256


class AuthEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One authentication event, as the audit log records it."""

    kind: AuthEventKind
    # Short stable code saying why (e.g. "bad_password", "unknown_user", "user_disabled").
    reason: str | None = None
    # The name the client claimed (not proof of identity on failures); truncated.
    username: str | None = None
    client_address: str | None = None
    # The refresh token family (login session) the event concerns.
    family: str | None = None
    # Seconds since the epoch.
    time: float


def event_username(name: str | None) -> str | None:
    return None if name is None else name[:MAX_EVENT_USERNAME_CHARS]


class AuthEventSink(Protocol):
    """Receives every event. Must neither block nor raise: it is called on the request path."""

    def emit(self, event: AuthEvent) -> None: ...


class LoggingEventSink:
    """A sink for deployments without an audit log: one warning line per failure."""

    def emit(self, event: AuthEvent) -> None:
        level = logging.INFO if event.kind.endswith(("succeeded", "logout")) else logging.WARNING
        log.log(level, "auth event %s", msgspec.json.encode(event).decode())

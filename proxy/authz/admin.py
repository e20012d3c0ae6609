"""Policy administration API: check, list, and change roles and rules through HTTP.

An aiohttp sub-application (`admin_api`) that the proxy mounts behind authentication:

    POST   /check                            {subject, object, action, domain?, roles?}
    GET    /subjects/{subject}/permissions   ?domain=&role=   rules reachable through roles
                                              (`g` lines in that domain; rules' first field)
    POST   /roles     {subject, role, domain?}      assign a role (a `g` line)
    DELETE /roles     {subject, role, domain?}      remove it
    POST   /policies  {fields: [...], ptype?: "p"}  add a rule
    DELETE /policies  {fields: [...], ptype?: "p"}  delete it

Promises: every call is authorized here too, by the policy in force (`policy:admin`,
`read` for GET and /check, `write` for changes), whatever the mount point checked before.
A change is written to the policy CSV atomically (temporary file, fsync, rename, directory
fsync), keeping comments and untouched lines byte for byte, and only after the whole new
policy was built and validated: a change that would make the policy invalid is refused
with 400 and leaves the file alone. Fields are checked so that no value can add a line,
a field or a comment (no commas, quotes, control characters or surrounding spaces), and
every rendered line must parse back to exactly the fields given. Then the store reloads,
the change is announced on Redis when configured, and it is audited. Bad input gets a
4xx with a JSON reason, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from proxy.audit import AuditEntry, AuditLog
from proxy.authz.engine import PolicyError, PolicyLine, parse_policy_text
from proxy.authz.store import (
    PolicyLoadError,
    PolicySnapshot,
    PolicyStore,
    build_snapshot,
    decide_principal,
)

__all__ = ["ADMIN_RESOURCE", "MAX_BODY_BYTES", "MAX_FIELD_LENGTH", "admin_api"]

log = logging.getLogger(__name__)

ADMIN_RESOURCE: Final = "policy:admin"
MAX_BODY_BYTES: Final = 64 * 1024
MAX_FIELD_LENGTH: Final = 512
MAX_FIELDS: Final = 16
MAX_CHECK_LENGTH: Final = 8 * 1024
DEFAULT_CHANNEL: Final = "lineage-sidecar:policy"
# Characters that would let a value change the CSV's structure or read differently to
# another CSV reader.
_FORBIDDEN: Final = frozenset(",\"'`")


class _Refused(Exception):
    """Ends a request with a 4xx JSON error."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


class CheckBody(msgspec.Struct, forbid_unknown_fields=True):
    subject: str
    object: str
    action: str
    domain: str | None = None
    roles: list[str] = []


class RoleBody(msgspec.Struct, forbid_unknown_fields=True):
    subject: str
    role: str
    domain: str | None = None


class RuleBody(msgspec.Struct, forbid_unknown_fields=True):
    fields: list[str]
    ptype: str = "p"


_Body = TypeVar("_Body", CheckBody, RoleBody, RuleBody)


@dataclass(frozen=True)
class _Caller:
    """The verified caller of one administration request."""

    principal: str
    roles: tuple[str, ...]
    request_id: str


@contextlib.contextmanager
def _file_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `.<name>.lock` beside `target`, held by one
    process at a time; released when the block ends or the process dies."""
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class _FileState(msgspec.Struct, frozen=True):
    """What the policy file looked like when read: a rename-over must not lose an edit
    made in between."""

    mtime_ns: int
    size: int
    inode: int


def admin_api(
    store: PolicyStore,
    *,
    policy_file: Path,
    audit: AuditLog | None,
    principal_of: Callable[[web.Request], str | None],
    roles_of: Callable[[web.Request], Sequence[str]] | None = None,
    redis_url: str | None = None,
    channel: str = DEFAULT_CHANNEL,
    domain: str | None = None,
) -> web.Application:
    """The administration sub-application for `store`; changes go to `policy_file`.

    `principal_of` (and `roles_of`, for token roles) name the verified caller. `domain` is
    the domain `policy:admin` is checked in, for models with domains. With `redis_url`,
    each change is announced on `channel` so other workers and replicas reload at once.
    """
    if Path(policy_file).resolve() not in {path.resolve() for path in store.policy_paths}:
        raise ValueError(f"{policy_file} is not one of the store's policy files")
    admin = _PolicyAdmin(
        store, Path(policy_file), audit, principal_of, roles_of, redis_url, channel, domain
    )
    app = web.Application()
    app.router.add_post("/check", admin.check)
    app.router.add_get("/subjects/{subject}/permissions", admin.permissions)
    app.router.add_post("/roles", admin.add_role)
    app.router.add_delete("/roles", admin.remove_role)
    app.router.add_post("/policies", admin.add_rule)
    app.router.add_delete("/policies", admin.remove_rule)
    return app


def _json(status: int, body: object) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(body), content_type="application/json"
    )


class _PolicyAdmin:
    def __init__(
        self,
        store: PolicyStore,
        policy_file: Path,
        audit: AuditLog | None,
        principal_of: Callable[[web.Request], str | None],
        roles_of: Callable[[web.Request], Sequence[str]] | None,
        redis_url: str | None,
        channel: str,
        domain: str | None,
    ) -> None:
        self.store = store
        self.policy_file = policy_file
        self.audit = audit
        self.principal_of = principal_of
        self.roles_of = roles_of
        self.redis_url = redis_url
        self.channel = channel
        self.domain = domain
        # One change at a time: read, edit, validate and rename must not interleave.
        self._write_lock = asyncio.Lock()

    # -- handlers ---------------------------------------------------------------------------

    async def check(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "read", self._check)

    async def permissions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "read", self._permissions)

    async def add_role(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "write", lambda r, c: self._role(r, c, add=True))

    async def remove_role(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "write", lambda r, c: self._role(r, c, add=False))

    async def add_rule(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "write", lambda r, c: self._rule(r, c, add=True))

    async def remove_rule(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "write", lambda r, c: self._rule(r, c, add=False))

    async def _handle(
        self,
        request: web.Request,
        action: str,
        handler: Callable[[web.Request, _Caller], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            caller = self._authorize(request, action)
            return await handler(request, caller)
        except _Refused as exc:
            return _json(exc.status, {"error": exc.error, "message": exc.message})

    def _authorize(self, request: web.Request, action: str) -> _Caller:
        principal = self.principal_of(request)
        if principal is None:
            raise _Refused(401, "unauthenticated", "authentication required")
        roles = tuple(self.roles_of(request)) if self.roles_of is not None else ()
        decision = decide_principal(
            self.store.current.engine, principal, roles, ADMIN_RESOURCE, action, self.domain
        )
        caller = _Caller(principal, roles, _request_id(request))
        if not decision.allowed:
            if action == "write":
                self._audit(request, caller, f"{ADMIN_RESOURCE}:{action}", None, decision.reason)
            raise _Refused(
                403,
                "forbidden",
                f"{principal} may not {action} {ADMIN_RESOURCE}: {decision.reason}",
            )
        return caller

    async def _check(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        body = await _body(request, CheckBody)
        # Nothing is written, so any text is fine; only size is bounded.
        for value in (body.subject, body.object, body.action, *body.roles):
            if not value or len(value) > MAX_CHECK_LENGTH:
                raise _Refused(
                    400, "bad_request", f"values must hold 1 to {MAX_CHECK_LENGTH} characters"
                )
        decision = decide_principal(
            self.store.current.engine,
            body.subject,
            body.roles,
            body.object,
            body.action,
            body.domain,
        )
        return _json(
            200,
            {
                "allowed": decision.allowed,
                "reason": decision.reason,
                "rule": list(decision.rule) if decision.rule is not None else None,
                "source": decision.source,
                "version": self.store.current.version,
            },
        )

    async def _permissions(self, request: web.Request, caller: _Caller) -> web.StreamResponse:
        subject = request.match_info["subject"]
        _check_value("subject", subject)
        domain = request.query.get("domain")
        token_roles = request.query.getall("role", [])
        snapshot = self.store.current
        reach = _reachable(snapshot.lines, subject, token_roles, domain)
        rules = [
            {
                "ptype": line.ptype,
                "rule": list(line.fields),
                "via": line.fields[0],
                "source": line.source,
            }
            for line in snapshot.lines
            if line.ptype.startswith("p") and line.fields and line.fields[0] in reach
        ]
        return _json(
            200,
            {
                "subject": subject,
                "roles": sorted(reach - {subject}),
                "permissions": rules,
                "version": snapshot.version,
            },
        )

    async def _role(self, request: web.Request, caller: _Caller, *, add: bool) -> web.Response:
        body = await _body(request, RoleBody)
        fields = [body.subject, body.role]
        if body.domain is not None:
            fields.append(body.domain)
        line = _render("g", fields)
        return await self._change(request, caller, line, add=add, kind="role")

    async def _rule(self, request: web.Request, caller: _Caller, *, add: bool) -> web.Response:
        body = await _body(request, RuleBody)
        if not body.ptype.startswith("p"):
            raise _Refused(
                400,
                "bad_request",
                "ptype must be a policy type (p, p2, ...); assign roles with /roles",
            )
        line = _render(body.ptype, body.fields)
        return await self._change(request, caller, line, add=add, kind="policy")

    # -- changing the file ------------------------------------------------------------------

    async def _change(
        self, request: web.Request, caller: _Caller, line: PolicyLine, *, add: bool, kind: str
    ) -> web.Response:
        text = ", ".join((line.ptype, *line.fields))
        action = f"{kind}:{'add' if add else 'remove'}"
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            original, state = await loop.run_in_executor(None, self._read_policy)
            edited = _edit(original, line, add=add)
            if edited is None:
                if add:
                    return _json(
                        200, {"changed": False, "line": text, "version": self.store.current.version}
                    )
                raise _Refused(404, "not_found", f"no line {text!r} in {self.policy_file}")
            try:
                snapshot = await loop.run_in_executor(None, self._validate, edited)
            except PolicyLoadError as exc:
                raise _Refused(
                    400, "invalid_policy", f"the change would break the policy: {exc}"
                ) from None
            # Audit before the file changes: a change that cannot be audited is not made.
            if not self._audit(request, caller, action, text, f"{action} in {self.policy_file}"):
                raise _Refused(503, "audit_unavailable", "the audit log is not accepting entries")
            try:
                await loop.run_in_executor(None, self._replace, edited, state)
            except _Refused:
                self._audit(request, caller, action, text, "not applied: file changed meanwhile")
                raise
            except OSError as exc:
                self._audit(request, caller, action, text, f"not applied: {exc}")
                log.error("policy admin: cannot write %s: %s", self.policy_file, exc)
                raise _Refused(
                    503, "write_failed", f"cannot write the policy file: {exc.strerror}"
                ) from None
            await self.store.reload_now()
        await self._announce(snapshot.version)
        return _json(
            201 if add else 200,
            {
                "changed": True,
                "line": text,
                "version": snapshot.version,
                # False only when another edit of the files got in between.
                "in_force": self.store.current.version == snapshot.version,
            },
        )

    def _read_policy(self) -> tuple[bytes, _FileState]:
        try:
            with self.policy_file.open("rb") as handle:
                info = os.fstat(handle.fileno())
                data = handle.read()
        except OSError as exc:
            raise _Refused(
                503, "read_failed", f"cannot read the policy file: {exc.strerror}"
            ) from None
        return data, _FileState(info.st_mtime_ns, info.st_size, info.st_ino)

    def _validate(self, policy: bytes) -> PolicySnapshot:
        store = self.store
        target = self.policy_file.resolve()

        def read(path: Path) -> tuple[str, bytes]:
            if path.resolve() == target:
                return str(path), policy
            try:
                return str(path), path.read_bytes()
            except OSError as exc:
                raise PolicyLoadError(str(path), None, f"cannot read: {exc.strerror}") from None

        return build_snapshot(
            read(store.model_path),
            [read(path) for path in store.policy_paths],
            read(store.routes_path),
        )

    def _replace(self, data: bytes, state: _FileState) -> None:
        target = self.policy_file
        temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, os.stat(target).st_mode & 0o7777)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            # The check and the rename under one lock that every process editing this
            # file takes (the asyncio lock only orders this worker's own changes): two
            # workers could otherwise both find the file unchanged, and the second rename
            # would silently undo the first change.
            with _file_lock(target):
                info = os.stat(target)
                if _FileState(info.st_mtime_ns, info.st_size, info.st_ino) != state:
                    raise _Refused(409, "conflict", f"{target} changed meanwhile; retry")
                os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def _announce(self, version: str) -> None:
        if self.redis_url is None:
            return
        try:
            await self.store.announce(self.redis_url, self.channel, version)
        except (RedisError, OSError) as exc:
            # The change is made; other workers still see it by polling the file.
            log.warning("policy admin: could not announce version %s: %s", version[:12], exc)

    def _audit(
        self, request: web.Request, caller: _Caller, action: str, rule: str | None, reason: str
    ) -> bool:
        if self.audit is None:
            return True
        return self.audit.record(
            AuditEntry(
                time_ns=time.time_ns(),
                request_id=caller.request_id,
                principal=caller.principal,
                roles=caller.roles,
                method=request.method,
                path=request.path,
                resource=ADMIN_RESOURCE,
                action=action,
                decision="allow" if rule is not None else "deny",
                rule=rule,
                reason=reason,
            )
        )


# -- pure helpers ---------------------------------------------------------------------------


def _request_id(request: web.Request) -> str:
    # The proxy's own id when it set one; never the client's X-Request-Id header.
    found = request.get("request_id")
    return found if isinstance(found, str) else os.urandom(12).hex()


async def _body(request: web.Request, kind: type[_Body]) -> _Body:
    """Read at most MAX_BODY_BYTES of JSON and decode it into `kind`."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _Refused(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(MAX_BODY_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return msgspec.json.decode(b"".join(chunks), type=kind)
    except msgspec.ValidationError as exc:
        raise _Refused(400, "bad_request", f"invalid request body: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _Refused(400, "bad_request", f"request body is not valid JSON: {exc}") from None


def _check_value(name: str, value: str) -> None:
    """Refuse a value that could change the CSV's structure or read differently."""
    if not value:
        raise _Refused(400, "bad_request", f"{name} must not be empty")
    if len(value) > MAX_FIELD_LENGTH:
        raise _Refused(400, "bad_request", f"{name} is longer than {MAX_FIELD_LENGTH} characters")
    if value != value.strip():
        raise _Refused(400, "bad_request", f"{name} must not start or end with whitespace")
    # isprintable() is False for newlines, other control characters and the Unicode line
    # and paragraph separators.
    bad = sorted({c for c in value if c in _FORBIDDEN or not c.isprintable()})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise _Refused(400, "bad_request", f"{name} contains characters not allowed: {shown}")


def _render(ptype: str, fields: Sequence[str]) -> PolicyLine:
    """The policy line for these fields, checked to parse back to exactly them."""
    if not fields or len(fields) > MAX_FIELDS:
        raise _Refused(400, "bad_request", f"fields must hold 1 to {MAX_FIELDS} values")
    _check_value("ptype", ptype)
    for index, value in enumerate(fields):
        _check_value(f"field {index + 1}", value)
    text = ", ".join((ptype, *fields))
    try:
        parsed = parse_policy_text(text, "<request>")
    except PolicyError as exc:
        raise _Refused(400, "bad_request", f"fields do not make a policy line: {exc}") from None
    expected = PolicyLine(ptype, tuple(fields))
    if [PolicyLine(p.ptype, p.fields) for p in parsed] != [expected]:
        raise _Refused(400, "bad_request", "fields do not read back as one policy line")
    return PolicyLine(ptype, tuple(fields))


def _edit(original: bytes, line: PolicyLine, *, add: bool) -> bytes | None:
    """The file with `line` appended (or every copy of it removed); None if no change.

    Other lines, comments and line endings are kept byte for byte.
    """
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(409, "conflict", f"the policy file is not valid UTF-8: {exc}") from None
    raw_lines = text.split("\n")
    kept = [raw for raw in raw_lines if not _same_line(raw, line)]
    if add:
        if len(kept) != len(raw_lines):
            return None
        rendered = ", ".join((line.ptype, *line.fields))
        separator = "" if text == "" or text.endswith("\n") else "\n"
        return (text + separator + rendered + "\n").encode("utf-8")
    if len(kept) == len(raw_lines):
        return None
    return "\n".join(kept).encode("utf-8")


def _same_line(raw: str, line: PolicyLine) -> bool:
    try:
        parsed = parse_policy_text(raw, "<line>")
    except PolicyError:
        return False
    return len(parsed) == 1 and parsed[0].ptype == line.ptype and parsed[0].fields == line.fields


def _reachable(
    lines: Sequence[PolicyLine], subject: str, roles: Sequence[str], domain: str | None
) -> set[str]:
    """The subject, its token roles, and every role they inherit through `g` lines (in
    `domain` when given)."""
    inherits: dict[str, list[str]] = {}
    for line in lines:
        if line.ptype != "g" or len(line.fields) < 2:
            continue
        if domain is not None and len(line.fields) >= 3 and line.fields[2] not in (domain, "*"):
            continue
        inherits.setdefault(line.fields[0], []).append(line.fields[1])
    seen = {subject, *roles}
    pending = list(seen)
    while pending:
        for parent in inherits.get(pending.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen

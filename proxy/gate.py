"""The gate every request passes before it is forwarded: authn -> authz -> audit.

In order: the target is normalized and matched to a route (the path the policy sees is
the path the upstream receives); unless the route is public, the caller is authenticated
(401 without credentials, 401/403/503 from a failed check: refused credentials, a
missing scope, or no answer); the policy decides on the
verified principal and its roles (403 when denied; a request no route matches is denied);
the decision is audited; the identity headers for the upstream are built. Any refusal is
a `Refusal` carrying what was learned so far, so the tap can record denied requests too.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import parse_qs, quote

import msgspec
from aiohttp import web

from agent.derive.sql import SqlUnparsed, tables_and_columns
from lineage_sidecar.config import IdentityHeadersConfig
from proxy.audit import AuditEntry, AuditLog, DecisionTail, decision_tail
from proxy.authn.chain import AuthChain
from proxy.authn.principal import AuthError, Principal
from proxy.authz.engine import Decision, PolicyEngine
from proxy.authz.paths import NormalizedPath, PathRejected
from proxy.authz.routes import RouteMatch, SqlSource
from proxy.authz.store import PolicySnapshot, PolicyStore, decide_principal
from proxy.authz.templates import ResourceTemplate
from proxy.internal import InternalBackend, longest_prefix_first

NO_ROUTE = "no route matches this request: deny by default"
PUBLIC = "public route"
NO_POLICY = "authenticated; no policy configured"
AUDIT_STUCK = "decisions cannot be audited now; refusing"
DUPLICATE_AUTHORIZATION = "send the Authorization header once"
INSUFFICIENT_SCOPE_CHALLENGE = 'Bearer realm="lineage-sidecar", error="insufficient_scope"'


class Admission(msgspec.Struct, frozen=True, gc=False):
    """What the gate learned about one request; complete when it is admitted.

    A msgspec Struct for its C-level constructor (a third of a dataclass's cost, once per
    request); never encoded. Untracked by the cycle collector: it refers to nothing that
    can refer back to it.
    """

    target: str
    principal: Principal | None = None
    match: RouteMatch | None = None
    decision: Decision | None = None
    outcome: str = "none"  # allow | deny | unauthenticated | rejected | none
    identity: bytes = b""
    # The Authorization header carried the verified credential and is not to go upstream.
    drop_authorization: bool = False
    # The audit entry of this decision after its time and request id, when the same
    # admission answers later requests (see `SnapshotMemo.admissions`).
    audit_tail: DecisionTail | None = None


class Refusal(Exception):
    """The gate said no: `status` and a JSON `error` for the client."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        admission: Admission,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.admission = admission
        self.headers = headers or {}


def header_value(text: str) -> bytes:
    """Printable ASCII passes; anything else (CR, LF, NUL, non-ASCII, and ',' which
    separates list items) is percent-encoded, so no identity value can break a header.
    So is a space at either end: HTTP drops a value's outer blanks, and a list reader
    trims each item's, which would make `carol ` arrive as `carol`, another identity."""
    if (
        text.isascii()
        and text.isprintable()
        and "," not in text
        and "%" not in text
        and text[:1] != " "
        and text[-1:] != " "
    ):
        return text.encode("ascii")
    out = []
    last = len(text) - 1
    for index, char in enumerate(text):
        code = ord(char)
        if 0x20 <= code < 0x7F and char not in ",%" and not (char == " " and index in (0, last)):
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out).encode("ascii")


def normalized_header_name(name: str | bytes) -> bytes:
    """How an upstream may read a header name: case folded, '_' taken for '-'."""
    raw = name.encode("latin-1") if isinstance(name, str) else name
    return raw.lower().replace(b"_", b"-")


def sql_from_query(query: str | None, param: str) -> str | None:
    """The SQL text in a query parameter (the first one of that name), if any."""
    if not query:
        return None
    values = parse_qs(query, keep_blank_values=False).get(param)
    return values[0] if values else None


def authorize_sql_tables(
    engine: PolicyEngine, principal: Principal, match: RouteMatch, decision: Decision
) -> tuple[Decision, str | None]:
    """The decision on a routed request once the SQL in its query is authorized table by
    table, where the route says how (`sql: {from: query, ..., tables: ...}`) and the route
    itself allowed it; and that SQL (None when there was nothing to check). The gate and
    `lineage-sidecar policy explain|test` both decide through this."""
    source = match.route.sql
    if not decision.allowed or source is None or source.tables is None:
        return decision, None
    sql = sql_from_query(match.path.query, source.param)
    if sql is None:
        return decision, None
    return sql_decision(engine, principal, match, source, source.tables, sql), sql


def sql_decision(
    engine: PolicyEngine,
    principal: Principal,
    match: RouteMatch,
    source: SqlSource,
    tables: ResourceTemplate,
    sql: str,
) -> Decision:
    """Every table the SQL reads needs `read`, every table it writes `write`.

    Fails closed: SQL that cannot be read, a statement whose effect cannot be told, or a
    table qualified with another database or schema is denied.
    """
    lineage = tables_and_columns(sql, source.dialect)
    if isinstance(lineage, SqlUnparsed):
        return Decision(
            False, f"SQL could not be read, so it cannot be authorized: {lineage.reason}"
        )
    if lineage.skipped:
        return Decision(
            False, f"SQL has a statement that cannot be authorized: {lineage.skipped[0]}"
        )
    checks = [(t, "read") for t in lineage.inputs] + [(t, "write") for t in lineage.outputs]
    for table, action in checks:
        qualifier = table.parts[:-1]
        if qualifier and qualifier != ("main",):
            return Decision(
                False, f"SQL names {table.qualified}: tables of another database are not allowed"
            )
        resource = tables.render({**match.params, "table": table.parts[-1]})
        decision = decide_principal(engine, principal.id, principal.roles, resource, action)
        if not decision.allowed:
            return Decision(
                False,
                f"SQL {action}s {resource}: {decision.reason}",
                rule=decision.rule,
                source=decision.source,
            )
    return Decision(True, f"SQL tables allowed ({len(checks)} checked)")


MEMO_ENTRIES = 50_000
# Entries that hold a principal (about a kilobyte each with an admission): fewer.
IDENTITY_ENTRIES = 10_000
ADMISSION_ENTRIES = 10_000
# Principals proved by the Authorization header (a JWT, or an introspected opaque token).
_BEARER_METHODS = frozenset({"jwt", "introspection"})
# Decisions that depend on nothing but the configuration, made once.
_NO_POLICY = Decision(True, NO_POLICY)
_NO_ROUTE = Decision(False, NO_ROUTE)
_PUBLIC = Decision(True, PUBLIC)


class SnapshotMemo:
    """Route matches and decisions remembered for one policy version.

    Both are pure functions of the snapshot and their inputs (method and raw target; the
    principal's id and roles, resource and action), so a repeated request skips path
    normalization, route matching and the policy walk. Bounded: emptied when full, so a
    flood of distinct paths or identities costs memory up to the bound and no more.
    Refusals (rejected paths) are not remembered.

    `admissions` goes one step further for the common request (a route matched, the
    caller's principal served from the token cache): the whole admission, audit tail
    included, by the identities of the principal and the route match objects, which are
    the same objects request after request. Each entry holds both, so neither id is
    reused while it is remembered.
    """

    __slots__ = ("_decisions", "_routes", "admissions", "snapshot")

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._routes: dict[tuple[str, str], tuple[NormalizedPath, RouteMatch | None]] = {}
        self._decisions: dict[tuple[str, tuple[str, ...], str, str], Decision] = {}
        self.admissions: dict[tuple[int, int], tuple[Principal, RouteMatch, Admission]] = {}

    def resolve(self, method: str, raw_target: str) -> tuple[NormalizedPath, RouteMatch | None]:
        key = (method, raw_target)
        found = self._routes.get(key)
        if found is None:
            found = self.snapshot.routes.resolve(method, raw_target)
            if len(self._routes) >= MEMO_ENTRIES:
                self._routes.clear()
            self._routes[key] = found
        return found

    def decide(self, principal: Principal, resource: str, action: str) -> Decision:
        key = (principal.id, principal.roles, resource, action)
        decision = self._decisions.get(key)
        if decision is None:
            decision = decide_principal(
                self.snapshot.engine, principal.id, principal.roles, resource, action
            )
            if len(self._decisions) >= MEMO_ENTRIES:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision


def _rule_text(decision: Decision | None) -> str | None:
    if decision is None or not decision.rule:
        return None
    text = ", ".join(decision.rule)
    return f"{text} ({decision.source})" if decision.source else text


class Gate:
    """Authentication, authorization and audit, configured once at start."""

    def __init__(
        self,
        *,
        auth: AuthChain,
        policy: PolicyStore | None,
        audit: AuditLog | None,
        identity: IdentityHeadersConfig,
        public_backends: Sequence[InternalBackend] = (),
        login_url: str | None = None,
        session_cookie: str | None = None,
        forward_authorization: bool = False,
    ) -> None:
        # Browsers without credentials go here, their target appended (`...?rd=`).
        self._login_url = login_url
        # Never forwarded upstream: the session id is the proxy's, not the service's.
        self.session_cookie = session_cookie
        self._auth = auth
        self._forward_authorization = forward_authorization
        # Longest prefix first: /_sidecar/policy is the admin API, not the identity
        # provider at /_sidecar, and must never inherit its "public".
        self._backends = longest_prefix_first(public_backends)
        self._memo_of: SnapshotMemo | None = None
        self._identities: dict[int, tuple[Principal, bytes]] = {}
        self._policy = policy
        self._audit = audit
        self._names = (
            identity.user.encode("ascii"),
            identity.email.encode("ascii"),
            identity.roles.encode("ascii"),
            identity.groups.encode("ascii"),
            identity.issuer.encode("ascii"),
        )
        # Client copies of these never reach the upstream, in any spelling.
        self.strip = frozenset(
            normalized_header_name(n)
            for n in (*self._names, *(s.encode("ascii") for s in identity.strip))
        )

    def _memo(self, snapshot: PolicySnapshot) -> SnapshotMemo:
        memo = self._memo_of
        if memo is None or memo.snapshot is not snapshot:
            # A new policy version: everything remembered of the old one is void.
            memo = self._memo_of = SnapshotMemo(snapshot)
        return memo

    def admit(
        self, request: web.BaseRequest, request_id: str
    ) -> Admission | Coroutine[Any, Any, Admission]:
        """The admission of `request`, or `Refusal`. Answered at once when nothing has to be
        waited for (a public route, a verified-token cache hit: most requests); otherwise
        what to await, which authenticates the caller and then decides the same way."""
        target = request.raw_path
        match = None
        snapshot = self._policy.current if self._policy is not None else None
        memo = self._memo(snapshot) if snapshot is not None else None
        if memo is not None:
            try:
                normalized, match = memo.resolve(request.method, target)
            except PathRejected as exc:
                refused = Admission(target=target, outcome="rejected")
                raise Refusal(exc.status, "bad_path", exc.reason, refused) from None
            target = normalized.upstream_target
        backend = (
            next((b for b in self._backends if b.matches(target)), None) if self._backends else None
        )
        if backend is not None and backend.public:
            decision = Decision(True, f"sidecar endpoint: {backend.name}")
            return self._admit_public(request, request_id, target, match, decision)
        if match is not None and match.route.public:
            return self._admit_public(request, request_id, target, match, _PUBLIC)
        if self._forward_authorization and len(request.headers.getall("Authorization", ())) > 1:
            # The first is verified and all are passed on: an upstream reading another
            # would act on a token nobody checked. Two are malformed anyway (RFC 9110 5.3).
            refused = Admission(target=target, match=match, outcome="rejected")
            raise Refusal(400, "duplicate_authorization", DUPLICATE_AUTHORIZATION, refused)
        principal = self._auth.cached(request.headers)
        if principal is None:
            return self._authenticate(request, request_id, target, match, memo, backend)
        return self._authorize(request, request_id, target, match, principal, memo, backend)

    def _admit_public(
        self,
        request: web.BaseRequest,
        request_id: str,
        target: str,
        match: RouteMatch | None,
        decision: Decision,
    ) -> Admission:
        admission = Admission(target=target, match=match, decision=decision, outcome="allow")
        if self._audit is not None:
            self._audit_or_refuse(request, request_id, admission)
        return admission

    async def _authenticate(
        self,
        request: web.BaseRequest,
        request_id: str,
        target: str,
        match: RouteMatch | None,
        memo: SnapshotMemo | None,
        backend: InternalBackend | None,
    ) -> Admission:
        try:
            principal = await self._auth.authenticate(request.headers)
        except AuthError as exc:
            admission = Admission(target=target, match=match, outcome="unauthenticated")
            self._audit_or_refuse(request, request_id, admission, reason=exc.reason)
            headers = {}
            # RFC 6750 3.1: a bad token is invalid_token (401), a good token without a
            # required scope insufficient_scope (403); 503 says nothing about the token.
            if exc.status == 401:
                message = "the credentials were refused"
                headers["WWW-Authenticate"] = (
                    f'Bearer realm="lineage-sidecar", error="invalid_token", '
                    f'error_description="{exc.reason}"'
                )
            elif exc.status == 403:
                message = "the credentials lack a scope this route requires"
                headers["WWW-Authenticate"] = INSUFFICIENT_SCOPE_CHALLENGE
            else:
                message = "authentication cannot be decided now"
            raise Refusal(exc.status, exc.reason, message, admission, headers) from None
        if principal is None:
            admission = Admission(target=target, match=match, outcome="unauthenticated")
            self._audit_or_refuse(request, request_id, admission, reason="no credentials")
            if self._login_url is not None and "text/html" in request.headers.get("Accept", ""):
                location = self._login_url + quote(target, safe="")
                raise Refusal(
                    302, "login_required", "sign in first", admission, {"Location": location}
                )
            raise Refusal(
                401,
                "unauthenticated",
                "this route needs credentials",
                admission,
                {"WWW-Authenticate": 'Bearer realm="lineage-sidecar"'},
            )
        return self._authorize(request, request_id, target, match, principal, memo, backend)

    def _authorize(
        self,
        request: web.BaseRequest,
        request_id: str,
        target: str,
        match: RouteMatch | None,
        principal: Principal,
        memo: SnapshotMemo | None,
        backend: InternalBackend | None,
    ) -> Admission:
        """The policy's decision on the verified `principal`, audited; Refusal when denied."""
        if memo is None:
            # No policy configured: every verified caller is admitted.
            admission = Admission(
                target,
                principal,
                match,
                _NO_POLICY,
                "allow",
                self._identity_lines(principal),
                # `_drops_authorization`, written out: this runs for every request.
                not self._forward_authorization and principal.auth_method in _BEARER_METHODS,
            )
            if self._audit is not None:
                self._audit_or_refuse(request, request_id, admission)
            return admission
        if match is not None and backend is None:
            known = memo.admissions.get((id(principal), id(match)))
            # The match object comes with its target from the route memo; the check on
            # the target only keeps this correct should that ever change.
            if (
                known is not None
                and known[0] is principal
                and known[1] is match
                and known[2].target is target
            ):
                admission = known[2]
                # `_admitted`, written out for the most common request of all.
                tail = admission.audit_tail
                if (
                    tail is not None
                    and self._audit is not None
                    and not self._audit.record_decision(time.time_ns(), request_id, tail)
                ):
                    raise Refusal(503, "audit_unavailable", AUDIT_STUCK, admission)
                if admission.outcome != "allow":
                    decided = admission.decision
                    reason = decided.reason if decided is not None else NO_ROUTE
                    raise Refusal(403, "forbidden", reason, admission)
                return admission
        decision: Decision
        if backend is not None and backend.resource is not None:
            action = "read" if request.method in ("GET", "HEAD") else "write"
            decision = memo.decide(principal, backend.resource, action)
        elif match is None:
            decision = _NO_ROUTE
        else:
            decision = memo.decide(principal, match.resource, match.action)
            if match.route.sql is not None:  # most routes carry no SQL: no call for them
                decision, _ = authorize_sql_tables(memo.snapshot.engine, principal, match, decision)
        allowed = decision.allowed
        # Built once, with every field, by position (Admission's field order): setting a
        # Struct's fields one by one, or matching keywords, costs more.
        admission = Admission(
            target,
            principal,
            match,
            decision,
            "allow" if allowed else "deny",
            self._identity_lines(principal) if allowed else b"",
            self._drops_authorization(principal),
        )
        if match is not None and backend is None:
            if self._audit is not None:
                tail = decision_tail(self._audit_entry(request, "", admission, None))
                admission = msgspec.structs.replace(admission, audit_tail=tail)
            if len(memo.admissions) >= ADMISSION_ENTRIES:
                memo.admissions.clear()
            memo.admissions[(id(principal), id(match))] = (principal, match, admission)
        return self._admitted(request, request_id, admission)

    def _drops_authorization(self, principal: Principal) -> bool:
        """Whether the Authorization header carried `principal`'s credential and so is not
        to go upstream (unless configured to)."""
        return not self._forward_authorization and principal.auth_method in _BEARER_METHODS

    def _admitted(
        self, request: web.BaseRequest, request_id: str, admission: Admission
    ) -> Admission:
        """`admission` audited, and returned if it allows the request; Refusal if not."""
        if self._audit is not None:
            self._audit_or_refuse(request, request_id, admission)
        if admission.outcome != "allow":
            reason = admission.decision.reason if admission.decision is not None else NO_ROUTE
            raise Refusal(403, "forbidden", reason, admission)
        return admission

    def _identity_lines(self, principal: Principal) -> bytes:
        """The identity header lines for `principal`. Cached principals are the same object
        request after request: their lines are built once. The entry holds the principal,
        so its id is not reused while it is remembered."""
        known = self._identities.get(id(principal))
        if known is not None and known[0] is principal:
            return known[1]
        if len(self._identities) >= IDENTITY_ENTRIES:
            self._identities.clear()
        lines = self._identity(principal)
        self._identities[id(principal)] = (principal, lines)
        return lines

    def _identity(self, principal: Principal) -> bytes:
        user, email, roles, groups, issuer = self._names
        lines = [user, b": ", header_value(principal.id), b"\r\n"]
        lines += (issuer, b": ", header_value(principal.issuer), b"\r\n")
        if principal.email is not None:
            lines += (email, b": ", header_value(principal.email), b"\r\n")
        if principal.roles:
            lines += (roles, b": ", b",".join(header_value(r) for r in principal.roles), b"\r\n")
        if principal.groups:
            lines += (groups, b": ", b",".join(header_value(g) for g in principal.groups), b"\r\n")
        return b"".join(lines)

    def _audit_or_refuse(
        self,
        request: web.BaseRequest,
        request_id: str,
        admission: Admission,
        *,
        reason: str | None = None,
    ) -> None:
        if self._audit is None:
            return
        if reason is None and admission.audit_tail is not None:
            recorded = self._audit.record_decision(time.time_ns(), request_id, admission.audit_tail)
        else:
            recorded = self._audit.record(self._audit_entry(request, request_id, admission, reason))
        if not recorded:
            raise Refusal(503, "audit_unavailable", AUDIT_STUCK, admission)

    @staticmethod
    def _audit_entry(
        request: web.BaseRequest, request_id: str, admission: Admission, reason: str | None
    ) -> AuditEntry:
        decision = admission.decision
        match = admission.match
        principal = admission.principal
        return AuditEntry(
            time_ns=time.time_ns(),
            request_id=request_id,
            principal=principal.id if principal is not None else None,
            roles=principal.roles if principal is not None else (),
            method=request.method,
            path=admission.target,
            resource=match.resource if match is not None else None,
            action=match.action if match is not None else None,
            decision=admission.outcome,
            rule=_rule_text(decision),
            reason=reason or (decision.reason if decision is not None else admission.outcome),
        )

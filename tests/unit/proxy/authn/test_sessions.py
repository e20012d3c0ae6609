"""Session cookies and lifetimes, with the in-process store (no sockets)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import proxy.authn.sessions as sessions_module
from proxy.authn.principal import AuthError, Principal
from proxy.authn.sessions import (
    InProcessSessionStore,
    SessionAuthenticator,
    SessionConfig,
    SessionManager,
    cookie_from_header,
    sign_session_id,
    verify_cookie_value,
    without_cookie,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
ALICE = Principal(
    id="alice", issuer="https://idp.example", auth_method="session", roles=("analyst",)
)
BOB = Principal(id="bob", issuer="https://idp.example", auth_method="session")
CONFIG = SessionConfig(idle_timeout=600, absolute_timeout=3600, touch_interval=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, keys: tuple[bytes, ...] = (KEY,)) -> SessionManager:
    return SessionManager(CONFIG, keys, InProcessSessionStore(clock=clock), clock=clock)


def cookie(manager: SessionManager, value: str) -> str:
    return f"theme=dark; {manager.config.cookie_name}={value}; other=1"


async def test_a_new_session_authenticates_its_principal() -> None:
    manager = make(Clock())
    value = await manager.create(ALICE)
    principal = await SessionAuthenticator(manager).authenticate(cookie(manager, value))
    assert principal is not None
    assert (principal.id, principal.roles) == ("alice", ("analyst",))
    assert principal.expires_at == 1_700_000_000.0 + 3600


def test_set_cookie_header_has_the_protective_attributes() -> None:
    header = make(Clock()).set_cookie_header("v")
    assert header.startswith("__Host-lineage_session=v; ")
    attributes = {part.strip() for part in header.split(";")[1:]}
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= attributes
    assert not any(part.lower().startswith("domain") for part in attributes)


async def test_cookie_holds_nothing_but_a_random_id_and_its_mac() -> None:
    manager = make(Clock())
    first, second = await manager.create(ALICE), await manager.create(ALICE)
    assert first != second
    assert "alice" not in first
    session_id, mac = first.split(".")
    assert len(session_id) == len(mac) == 43


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "theme=dark",
        "__Host-lineage_session=",
        "__Host-lineage_session=garbage",
        "__Host-lineage_session=" + "A" * 43 + "." + "B" * 43,
        "__Host-lineage_session=\x00",
    ],
)
async def test_missing_or_malformed_cookies_are_no_session(header: str | None) -> None:
    assert await SessionAuthenticator(make(Clock())).authenticate(header) is None


async def test_tampered_cookie_is_no_session() -> None:
    manager = make(Clock())
    value = await manager.create(ALICE)
    session_id, mac = value.split(".")
    flipped_id = ("B" if session_id[0] == "A" else "A") + session_id[1:]
    flipped_mac = mac[:-1] + ("B" if mac[-1] == "A" else "A")
    authenticator = SessionAuthenticator(manager)
    for forged in (f"{flipped_id}.{mac}", f"{session_id}.{flipped_mac}", session_id, value + "x"):
        assert await authenticator.authenticate(cookie(manager, forged)) is None


async def test_cookie_signed_with_another_key_is_no_session() -> None:
    clock = Clock()
    store = InProcessSessionStore(clock=clock)
    issuing = SessionManager(CONFIG, (OTHER_KEY,), store, clock=clock)
    value = await issuing.create(ALICE)
    checking = SessionManager(CONFIG, (KEY,), store, clock=clock)
    assert await SessionAuthenticator(checking).authenticate(cookie(checking, value)) is None
    # During a key rotation both keys are accepted.
    rotating = SessionManager(CONFIG, (KEY, OTHER_KEY), store, clock=clock)
    assert await SessionAuthenticator(rotating).authenticate(cookie(rotating, value)) == (
        await SessionAuthenticator(issuing).authenticate(cookie(issuing, value))
    )


async def test_a_cookie_sent_twice_is_not_trusted() -> None:
    manager = make(Clock())
    value = await manager.create(ALICE)
    name = manager.config.cookie_name
    assert (
        await SessionAuthenticator(manager).authenticate(f"{name}={value}; {name}={value}") is None
    )


async def test_idle_timeout_ends_the_session_and_activity_extends_it() -> None:
    clock = Clock()
    manager = make(clock)
    authenticator = SessionAuthenticator(manager)
    value = await manager.create(ALICE)
    for _ in range(5):  # active for 5 * 500 s, longer than the idle timeout
        clock.now += 500
        assert await authenticator.authenticate(cookie(manager, value)) is not None
    clock.now += 601
    assert await authenticator.authenticate(cookie(manager, value)) is None
    clock.now -= 601  # the record was deleted, not merely judged too old
    assert await authenticator.authenticate(cookie(manager, value)) is None


async def test_absolute_timeout_ends_even_an_active_session() -> None:
    clock = Clock()
    manager = make(clock)
    authenticator = SessionAuthenticator(manager)
    value = await manager.create(ALICE)
    while clock.now < 1_700_000_000.0 + 3600 - 300:
        clock.now += 300
        assert await authenticator.authenticate(cookie(manager, value)) is not None
    clock.now += 300
    assert await authenticator.authenticate(cookie(manager, value)) is None


async def test_an_earlier_end_set_by_the_idp_ends_an_active_session() -> None:
    clock = Clock()
    manager = make(clock)
    authenticator = SessionAuthenticator(manager)
    value = await manager.create(ALICE, ends_at=clock.now + 1000)
    principal = await authenticator.authenticate(cookie(manager, value))
    assert principal is not None
    assert principal.expires_at == clock.now + 1000
    for _ in range(3):  # active all along: the idle timeout never strikes
        clock.now += 300
        assert await authenticator.authenticate(cookie(manager, value)) is not None
    clock.now += 100
    assert await authenticator.authenticate(cookie(manager, value)) is None
    # An end after the absolute timeout changes nothing.
    late = await manager.create(ALICE, ends_at=clock.now + 10 * 3600)
    principal = await authenticator.authenticate(cookie(manager, late))
    assert principal is not None
    assert principal.expires_at == clock.now + 3600


async def test_login_replaces_the_browsers_previous_session() -> None:
    manager = make(Clock())
    authenticator = SessionAuthenticator(manager)
    planted = await manager.create(BOB)
    fresh = await manager.create(ALICE, previous_cookie_header=cookie(manager, planted))
    assert fresh != planted
    assert await authenticator.authenticate(cookie(manager, planted)) is None
    principal = await authenticator.authenticate(cookie(manager, fresh))
    assert principal is not None
    assert principal.id == "alice"


async def test_logout_ends_one_session_and_everywhere_ends_all() -> None:
    manager = make(Clock())
    authenticator = SessionAuthenticator(manager)
    laptop = await manager.create(ALICE)
    phone = await manager.create(ALICE)
    tablet = await manager.create(ALICE)
    bobs = await manager.create(BOB)
    laptop_id = manager.session_id_from(cookie(manager, laptop))
    assert laptop_id is not None
    assert await manager.end(laptop_id) == await authenticator.authenticate(cookie(manager, phone))
    assert await authenticator.authenticate(cookie(manager, laptop)) is None
    assert await manager.end_everywhere(ALICE) == 2
    for value in (phone, tablet):
        assert await authenticator.authenticate(cookie(manager, value)) is None
    assert await authenticator.authenticate(cookie(manager, bobs)) is not None


async def test_stashed_values_are_claimed_once_and_expire() -> None:
    clock = Clock()
    store = InProcessSessionStore(clock=clock)
    await store.stash("state", b"pending", ttl=60)
    assert await store.claim("state") == b"pending"
    assert await store.claim("state") is None
    await store.stash("late", b"pending", ttl=60)
    clock.now += 61
    assert await store.claim("late") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cookie_name": "bad name"}, "cookie_name"),
        ({"cookie_name": "a;b"}, "cookie_name"),
        ({"idle_timeout": 7200, "absolute_timeout": 3600}, "idle_timeout"),
        ({"touch_interval": 600, "idle_timeout": 600}, "touch_interval"),
    ],
)
def test_config_refuses_inconsistent_settings(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionConfig(**fields)  # type: ignore[arg-type]


def test_short_signing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SessionManager(CONFIG, (b"short",), InProcessSessionStore())


class DownStore(InProcessSessionStore):
    async def load(self, session_key: str) -> bytes | None:
        raise AuthError("session_store_unavailable", 503)


async def test_store_down_fails_closed_with_503() -> None:
    manager = make(Clock())
    value = await manager.create(ALICE)
    down = SessionManager(CONFIG, (KEY,), DownStore(), clock=Clock())
    with pytest.raises(AuthError) as raised:
        await SessionAuthenticator(down).authenticate(cookie(down, value))
    assert raised.value.status == 503


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_no_forged_value_verifies(value: str) -> None:
    assert verify_cookie_value((KEY,), value) is None or value == sign_session_id(
        KEY, value.split(".")[0]
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 85), st.sampled_from("AQgw-_9z"))
def test_any_single_character_change_breaks_the_mac(raw: bytes, position: int, char: str) -> None:
    session_id = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    value = sign_session_id(KEY, session_id)
    assert verify_cookie_value((KEY,), value) == session_id
    changed = value[:position] + char + value[position + 1 :]
    if changed != value:
        assert verify_cookie_value((KEY,), changed) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_cookie_header_parsing_never_raises(header: str) -> None:
    cookie_from_header(header, "__Host-lineage_session")


SESSION = "__Host-lineage_session"
OTHERS = ("theme", "lang", "__Host-lineage_session2")
# Cookie headers as clients could send them: names with every kind of blank around them,
# values with `=`, non-ASCII and "\udcff" (how aiohttp hands over a byte that is not UTF-8).
_BLANKS = st.text(alphabet=" \t\x0b\x0c\xa0\x1c", max_size=2)
_PAIRS = st.tuples(
    _BLANKS,
    st.sampled_from([SESSION, *OTHERS, ""]),
    _BLANKS,
    st.sampled_from(["=", ""]),
    st.text(alphabet="v= é\udcff", max_size=3),
).map("".join)
_HEADERS = st.lists(_PAIRS, max_size=5).map(";".join)


@pytest.mark.parametrize(
    "spelling",
    [f"{SESSION}=v", f"{SESSION} =v", f"{SESSION}\t= v", f" {SESSION}\x0b=v", f"{SESSION}="],
)
def test_every_spelling_the_authenticator_reads_is_dropped_for_the_upstream(
    spelling: str,
) -> None:
    header = f"theme=dark;{spelling}; lang=en"
    assert cookie_from_header(header, SESSION) is not None
    assert without_cookie(header.encode(), SESSION.encode()) == b"theme=dark; lang=en"


@settings(max_examples=500, deadline=None)
@given(_HEADERS)
def test_no_session_cookie_survives_the_forward_filter(header: str) -> None:
    raw = header.encode("utf-8", "surrogateescape")
    kept = without_cookie(raw, SESSION.encode()).decode("utf-8", "surrogateescape")
    # One session cookie added after filtering is read: had any part the authenticator
    # takes for the session cookie survived, there would be two, and it would read none.
    assert cookie_from_header(f"{kept}; {SESSION}=probe", SESSION) == "probe"
    # Every other cookie reads as it did.
    for name in OTHERS:
        assert cookie_from_header(kept, name) == cookie_from_header(header, name)


async def test_pending_sign_ins_in_process_are_bounded_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Anyone can begin a sign-in: without Redis, a flood of /start requests must not grow
    # the process without bound. The oldest pending sign-ins go first.
    monkeypatch.setattr(sessions_module, "MAX_PENDING_SIGN_INS", 50)
    store = InProcessSessionStore()
    for index in range(200):
        await store.stash(f"state-{index}", b"pending", 600)
    assert len(store._values) == 50
    assert await store.claim("state-149") is None
    assert await store.claim("state-150") == b"pending"
    assert await store.claim("state-150") is None  # once only
    # A claimed one frees its place: one more fits, and the oldest left is not forgotten.
    await store.stash("state-200", b"pending", 600)
    assert await store.claim("state-151") == b"pending"

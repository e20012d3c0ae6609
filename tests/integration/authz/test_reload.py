"""Hot reload of the policy files: real files, a running poller, and real Redis pub/sub.

No test asserts how fast anything is: each waits until the expected state is reached
within a generous deadline, and fails naming what it waited for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from proxy.authz.store import PolicySnapshot, PolicyStore, decide_principal, load_snapshot

REPO = Path(__file__).resolve().parents[3]
DEADLINE_S = 10.0


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Wait until `predicate()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def replace_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    for name in ("model.conf", "policy.csv", "routes.yaml"):
        shutil.copy(REPO / "policies" / name, tmp_path / name)
    return tmp_path


def make_store(folder: Path, **options: float) -> PolicyStore:
    store = PolicyStore(
        folder / "model.conf",
        [folder / "policy.csv"],
        folder / "routes.yaml",
        poll_interval=options.get("poll_interval", 0.05),
    )
    store.load()
    return store


@pytest.fixture
async def running_store(policy_dir: Path) -> AsyncIterator[PolicyStore]:
    store = make_store(policy_dir)
    task = asyncio.create_task(store.run(), name="policy-store-run")
    yield store
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def dave_reads_sales(store: PolicyStore) -> bool:
    return store.current.engine.decide("dave", "dataset:sales.orders", "read").allowed


async def test_an_edit_takes_effect_without_restart(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    policy = policy_dir / "policy.csv"
    assert not dave_reads_sales(running_store)
    # Appending in place, as an editor or `echo >>` would.
    with policy.open("a", encoding="utf-8") as handle:
        handle.write("g, dave, analyst\n")
    await eventually(lambda: dave_reads_sales(running_store), "dave's new role is in force")
    assert running_store.reloads_ok == 1
    assert running_store.status() is None


async def test_a_same_size_rewrite_with_the_same_mtime_is_seen(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    """Coarse file timestamps: a second write in the same tick, of the same size, leaves
    mtime, size and inode as they were; the change must still be picked up."""
    policy = policy_dir / "policy.csv"
    base = policy.read_text(encoding="utf-8")
    policy.write_text(base + "g, dave, analyst\n", encoding="utf-8")
    await eventually(lambda: dave_reads_sales(running_store), "dave's role is in force")
    before = os.stat(policy)
    policy.write_text(base + "g, evan, analyst\n", encoding="utf-8")
    os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(policy)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    )
    await eventually(lambda: not dave_reads_sales(running_store), "the rewrite is in force")
    assert running_store.current.engine.decide("evan", "dataset:sales.t", "read").allowed


async def test_a_broken_edit_keeps_the_last_good_policy_until_fixed(
    running_store: PolicyStore, policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = policy_dir / "policy.csv"
    good = policy.read_text(encoding="utf-8")
    serving = running_store.current.version
    lines_before = good.count("\n")
    replace_atomically(policy, good + "g, dave, analyst\np, dave, dataset:x, read\n")

    await eventually(lambda: running_store.reloads_failed == 1, "the broken edit is noticed")
    assert running_store.current.version == serving
    # Neither line of the broken version is in force: never half a policy.
    assert not dave_reads_sales(running_store)
    assert running_store.current.engine.decide("alice", "dataset:sales.orders", "read").allowed
    status = running_store.status()
    assert status is not None
    assert f"serving version {serving[:12]}" in status
    assert f"{policy}:{lines_before + 2}: p line has 3 fields" in status
    assert running_store.last_error is not None
    assert running_store.last_error.line == lines_before + 2

    # The same broken content again (a touch) is not rebuilt, counted or logged again.
    os.utime(policy)
    await running_store.reload_now()
    assert running_store.reloads_failed == 1
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    assert f"{policy}:{lines_before + 2}" in failures[0].getMessage()

    replace_atomically(policy, good + "g, dave, analyst\n")
    await eventually(lambda: dave_reads_sales(running_store), "the fixed policy is in force")
    assert running_store.status() is None
    assert running_store.last_error is None
    assert running_store.reloads_ok == 1


async def test_an_oversized_field_is_refused_and_the_next_fix_lands(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    """A 1.2 MB glob used to keep the build (and the fix after it) busy for ~20 s."""
    policy = policy_dir / "policy.csv"
    good = policy.read_text(encoding="utf-8")
    serving = running_store.current.version
    huge = "dataset:" + "a" * 1_200_000
    replace_atomically(policy, good + f"p, analyst, {huge}, read, allow\n")
    await eventually(lambda: running_store.reloads_failed == 1, "the oversized field is refused")
    assert running_store.current.version == serving
    assert running_store.last_error is not None
    assert running_store.last_error.line == good.count("\n") + 1
    assert "more than the 4,096 allowed" in running_store.last_error.reason

    replace_atomically(policy, good + "g, dave, analyst\n")
    await eventually(lambda: dave_reads_sales(running_store), "the fix is in force")
    assert running_store.status() is None


async def test_a_broken_route_file_keeps_the_routes(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    routes = policy_dir / "routes.yaml"
    replace_atomically(routes, routes.read_text(encoding="utf-8") + "  - {oops\n")
    await eventually(lambda: running_store.status() is not None, "the broken routes are noticed")
    assert str(routes) in (running_store.status() or "")
    _, match = running_store.current.routes.resolve("GET", "/sales/orders")
    assert match is not None


async def test_rapid_edits_converge_to_the_last(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    policy = policy_dir / "policy.csv"
    base = policy.read_text(encoding="utf-8")
    seen_failures: list[str] = []

    async def decide_all_along() -> None:
        # The hot path keeps deciding during every swap; nothing may fail or flip alice.
        while True:
            decision = running_store.current.engine.decide("alice", "dataset:sales.x", "read")
            if not decision.allowed:
                seen_failures.append(decision.reason)
            await asyncio.sleep(0)

    reader = asyncio.create_task(decide_all_along(), name="hot-path-reader")
    try:
        for number in range(30):
            # Alternate in-place rewrites and renames.
            text = base + f"g, user{number}, analyst\n"
            if number % 2:
                policy.write_text(text, encoding="utf-8")
            else:
                replace_atomically(policy, text)
            await asyncio.sleep(0.005)
        expected = load_snapshot(
            policy_dir / "model.conf", [policy], policy_dir / "routes.yaml"
        ).version
        await eventually(
            lambda: running_store.current.version == expected, "the last edit is in force"
        )
    finally:
        reader.cancel()
    assert running_store.current.engine.decide("user29", "dataset:sales.x", "read").allowed
    assert not running_store.current.engine.decide("user28", "dataset:sales.x", "read").allowed
    assert seen_failures == []


async def test_ten_thousand_rules_reload(running_store: PolicyStore, policy_dir: Path) -> None:
    # How long the reload takes is measured by benchmarks/policy_engine.py, not here.
    policy = policy_dir / "policy.csv"
    rules = "".join(
        f"p, team{n % 1000}, dataset:db{n}.*, {'read' if n % 3 else 'write'}, allow\n"
        for n in range(10_000)
    )
    text = policy.read_text(encoding="utf-8") + rules + "g, dave, team999\n"

    swapped: list[PolicySnapshot] = []
    running_store.on_change = swapped.append
    replace_atomically(policy, text)
    await eventually(lambda: bool(swapped), "the 10,000-rule policy is in force", timeout=30)
    assert running_store.current.engine.rule_count == 10_009
    assert running_store.current.engine.decide("dave", "dataset:db1999.t", "read").allowed
    assert not running_store.current.engine.decide("dave", "dataset:db9998.t", "read").allowed


async def test_missing_file_keeps_the_policy_and_recovers(
    running_store: PolicyStore, policy_dir: Path
) -> None:
    policy = policy_dir / "policy.csv"
    text = policy.read_text(encoding="utf-8")
    policy.unlink()
    await eventually(lambda: running_store.status() is not None, "the missing file is noticed")
    assert "cannot read" in (running_store.status() or "")
    # Still missing: not counted or logged again.
    await running_store.reload_now()
    assert running_store.reloads_failed == 1
    assert running_store.current.engine.decide("alice", "dataset:sales.x", "read").allowed
    policy.write_text(text + "g, dave, analyst\n", encoding="utf-8")
    await eventually(lambda: dave_reads_sales(running_store), "the file is back")
    assert running_store.status() is None


async def test_on_change_sees_each_new_snapshot(policy_dir: Path) -> None:
    changes: list[PolicySnapshot] = []
    store = make_store(policy_dir)
    store.on_change = changes.append
    policy = policy_dir / "policy.csv"
    policy.write_text(policy.read_text(encoding="utf-8") + "g, dave, analyst\n")
    snapshot = await store.reload_now()
    assert changes == [snapshot]
    # Nothing new: no swap, no callback.
    assert await store.reload_now() is snapshot
    assert changes == [snapshot]


async def test_token_roles_through_a_reloaded_snapshot(policy_dir: Path) -> None:
    store = make_store(policy_dir)
    engine = store.current.engine
    assert decide_principal(engine, "erin", ["engineer"], "dataset:sales.t", "write").allowed
    assert not decide_principal(
        engine, "erin", ["engineer"], "dataset:sales.secret", "read"
    ).allowed


# -- convergence over Redis -----------------------------------------------------------------


async def subscribers(redis_url: str, channel: str) -> int:
    client = Redis.from_url(redis_url)
    try:
        counts = await client.pubsub_numsub(channel)
    finally:
        await client.aclose()
    return int(counts[0][1])


@pytest.mark.services
async def test_an_announced_change_reloads_another_instance(
    redis_url: str, policy_dir: Path
) -> None:
    channel = f"test-policy-{uuid.uuid4().hex}"
    writer = make_store(policy_dir)
    # The second instance never polls within the test: only the announcement can reach it.
    follower = make_store(policy_dir, poll_interval=3600)
    listening = asyncio.create_task(follower.listen(redis_url, channel), name="policy-listen")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while await subscribers(redis_url, channel) < 1:
            assert time.monotonic() < deadline, "the follower never subscribed"
            await asyncio.sleep(0.02)
        policy = policy_dir / "policy.csv"
        replace_atomically(policy, policy.read_text(encoding="utf-8") + "g, dave, analyst\n")
        snapshot = await writer.reload_now()
        assert await writer.announce(redis_url, channel, snapshot.version) == 1
        await eventually(
            lambda: follower.current.version == snapshot.version, "the follower reloaded"
        )
        assert dave_reads_sales(follower)
    finally:
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening

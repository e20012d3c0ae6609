"""The audit chain: any edit, removal or reordering of a line is found, and named."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.audit import GENESIS, AuditEntry, AuditLine, AuditLog, decision_tail, verify


def entry(index: int, decision: str = "allow") -> AuditEntry:
    return AuditEntry(
        time_ns=1_700_000_000_000_000_000 + index,
        request_id=f"req-{index}",
        principal="alice",
        roles=("analyst",),
        method="GET",
        path=f"/tables/t{index}",
        resource=f"dataset:t{index}",
        action="read",
        decision=decision,
        rule="p, analyst, dataset:*, read",
        reason="matched allow rule",
    )


def write_log(path: Path, count: int, start: int = 0) -> AuditLog:
    log = AuditLog(path)
    for index in range(start, start + count):
        assert log.record(entry(index))
    asyncio.run(log.flush())
    return log


def test_chain_verifies_and_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    write_log(path, 3, start=5)  # a new process appends to the same chain
    result = verify([path])
    assert result.ok, result.problem
    assert result.lines == 8
    lines = [msgspec.json.decode(raw, type=AuditLine) for raw in path.read_bytes().splitlines()]
    assert [line.seq for line in lines] == list(range(1, 9))
    assert lines[0].prev == GENESIS


def test_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 1)
    assert path.stat().st_mode & 0o777 == 0o600


def test_edited_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = path.read_bytes().splitlines()
    lines[2] = lines[2].replace(b'"decision":"allow"', b'"decision":"deny"')
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = verify([path])
    assert not result.ok
    assert result.problem is not None
    assert result.problem.startswith(f"{path}:3: content does not match")


def test_removed_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = path.read_bytes().splitlines()
    del lines[1]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = verify([path])
    assert not result.ok
    assert result.problem is not None
    assert f"{path}:2: seq 3, expected 2" in result.problem


def test_removed_first_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[1:]) + b"\n")
    result = verify([path])
    assert not result.ok


def test_rotated_files_verify_together(tmp_path: Path) -> None:
    first, second = tmp_path / "audit.1.jsonl", tmp_path / "audit.2.jsonl"
    write_log(first, 4)
    log = AuditLog(second)
    log._seq, log._prev = verify([first]).lines, verify([first]).last_hash
    for index in range(4, 7):
        log.record(entry(index))
    asyncio.run(log.flush())
    assert verify([first, second]).ok
    assert not verify([second]).ok  # alone, it does not start at the genesis hash
    assert not verify([second, first]).ok


def test_stuck_log_refuses_instead_of_dropping(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_pending=3)
    assert [log.record(entry(i)) for i in range(5)] == [True, True, True, False, False]
    assert log.pending == 3


def test_failed_write_keeps_the_batch(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.jsonl")
    log.record(entry(1))
    try:
        asyncio.run(log.flush())
    except OSError:
        pass
    else:
        raise AssertionError("writing under a file should fail")
    assert log.pending == 1


@given(position=st.integers(min_value=0), replacement=st.integers(min_value=0, max_value=255))
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_byte_change_is_detected_or_changes_nothing(
    tmp_path: Path, position: int, replacement: int
) -> None:
    path = tmp_path / "audit.jsonl"
    if not path.exists():
        write_log(path, 4)
    original = path.read_bytes()
    index = position % len(original)
    if original[index] == replacement:
        return
    tampered = original[:index] + bytes([replacement]) + original[index + 1 :]
    changed = tmp_path / "tampered.jsonl"
    changed.write_bytes(tampered)
    result = verify([changed])
    if result.ok:
        # Only a change that decodes to the very same lines may pass (e.g. a no-op escape).
        decode = msgspec.json.Decoder(AuditLine)
        assert [decode.decode(r) for r in tampered.splitlines() if r] == [
            decode.decode(r) for r in original.splitlines() if r
        ]


def test_cli_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    cli = str(Path(sys.executable).with_name("lineage-sidecar"))
    good = subprocess.run(
        [cli, "audit", "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert good.returncode == 0
    assert "3 lines" in good.stdout
    path.write_bytes(path.read_bytes().replace(b"alice", b"mallory", 1))
    bad = subprocess.run(
        [cli, "audit", "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert f"{path}:1:" in bad.stderr


_hostile_text = st.lists(
    st.sampled_from(['"', "\\", "}", ",", ":", "hash", '"hash":""}', " ", "\n", "é", "\x00"]),
    max_size=12,
).map("".join)


@given(
    principal=_hostile_text,
    path=_hostile_text,
    reason=_hostile_text,
    request_id=_hostile_text,
    roles=st.lists(_hostile_text, max_size=3).map(tuple),
    rule=st.none() | _hostile_text,
    time_ns=st.integers(min_value=0, max_value=2**63 - 1),
)
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_each_line_is_its_own_encoding_with_its_hash(
    tmp_path: Path,
    principal: str,
    path: str,
    reason: str,
    request_id: str,
    roles: tuple[str, ...],
    rule: str | None,
    time_ns: int,
) -> None:
    # The writer puts a line together from parts (the decision's tail was encoded once,
    # on the request path) and the hash in at the end; whatever the fields hold (quotes,
    # `"hash":""}`), the line must be exactly its AuditLine encoded, and its hash SHA-256
    # over `prev` and that encoding with an empty hash.
    hostile = msgspec.structs.replace(
        entry(0),
        principal=principal,
        path=path,
        reason=reason,
        request_id=request_id,
        roles=roles,
        rule=rule,
        time_ns=time_ns,
    )
    log_path = tmp_path / f"audit-{len(list(tmp_path.iterdir()))}.jsonl"
    log = AuditLog(log_path)
    assert log.record(hostile)
    assert log.record(entry(1))
    assert log.record_decision(7, request_id, decision_tail(hostile))
    asyncio.run(log.flush())
    encoder = msgspec.json.Encoder(order="deterministic")
    raws = log_path.read_bytes().splitlines()
    lines = [msgspec.json.decode(raw, type=AuditLine) for raw in raws]
    assert [encoder.encode(line) for line in lines] == raws
    prev = GENESIS
    for line in lines:
        unhashed = encoder.encode(msgspec.structs.replace(line, hash=""))
        assert line.prev == prev
        assert line.hash == hashlib.sha256(prev.encode() + unhashed).hexdigest()
        prev = line.hash
    assert lines[0].entry == hostile
    assert lines[2].entry == msgspec.structs.replace(hostile, time_ns=7)
    assert verify([log_path]).ok


def test_text_that_is_not_unicode_is_written_escaped_not_lost(tmp_path: Path) -> None:
    # A JSON claim or a login name may carry a lone surrogate ("\udcff"), which no
    # UTF-8 encoder takes: the decision is still recorded, visibly escaped, and verifies.
    log_path = tmp_path / "audit.jsonl"
    log = AuditLog(log_path)
    odd = msgspec.structs.replace(
        entry(0), principal="a\udcffb", roles=("r\ud800",), request_id="id\udc80"
    )
    assert log.record(odd)
    assert log.record(entry(1))
    asyncio.run(log.flush())
    lines = [msgspec.json.decode(raw, type=AuditLine) for raw in log_path.read_bytes().splitlines()]
    assert lines[0].entry.principal == "a\\udcffb"
    assert lines[0].entry.roles == ("r\\ud800",)
    assert lines[0].entry.request_id == "id\\udc80"
    assert lines[1].entry == entry(1)
    assert verify([log_path]).ok


_DISK_FILLS_UP = """
import asyncio, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from proxy.audit import AuditLog, verify
from tests.unit.proxy.test_audit import entry

path = Path(sys.argv[1])
log = AuditLog(path)
for index in range(10):
    log.record(entry(index))
asyncio.run(log.flush())
size = path.stat().st_size
# The file may grow by half a line more, no further: the next batch is cut short.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 150, hard))
for index in range(10, 20):
    log.record(entry(index))
try:
    asyncio.run(log.flush())
except OSError as exc:
    print("refused:", exc.strerror)
else:
    raise SystemExit("the write over the limit should have failed")
assert path.stat().st_size == size, (path.stat().st_size, size)
assert log.pending == 10
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
asyncio.run(log.flush())
result = verify([path])
print("lines:", result.lines, "ok:", result.ok, result.problem)
"""


def test_a_batch_cut_short_by_the_disk_leaves_no_half_lines(tmp_path: Path) -> None:
    # A full disk (here: a file size limit, in a child process) stops a batch after
    # some of its bytes; what did get in is taken out again, so the retry continues an
    # intact chain and every decision is there once.
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", _DISK_FILLS_UP, str(tmp_path / "audit.jsonl"), str(repo)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: File too large" in done.stdout
    assert "lines: 20 ok: True None" in done.stdout

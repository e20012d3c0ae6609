"""Start, stop and scale: draining shutdown, several workers, clear start-up errors."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml

from tests.integration.proxy.conftest import CLI, run_proxy, wait_for_readyz
from tests.integration.proxy.rawhttp import Reply, get
from tests.integration.proxy.test_gate import MODEL, POLICY, ROUTES


def test_sigterm_drains_in_flight_requests(echo_upstream: str, tmp_path: Path) -> None:
    with run_proxy(tmp_path, echo_upstream, proxy={"timeouts": {"shutdown": 10}}) as proxy:
        replies: list[Reply] = []
        slow = threading.Thread(target=lambda: replies.append(get(proxy.port, "/__slow?ms=1500")))
        slow.start()
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        slow.join(10)
        assert [r.status for r in replies] == [200]
        assert proxy.process.wait(timeout=15) == 0


def test_two_workers_share_the_port_and_the_metrics(echo_upstream: str, tmp_path: Path) -> None:
    with run_proxy(tmp_path, echo_upstream, proxy={"workers": 2}) as proxy:
        statuses = [get(proxy.port, f"/w/{i}").status for i in range(40)]
        assert statuses == [200] * 40
        ready = get(proxy.admin_port, "/readyz")
        assert ready.status == 200
        metrics = get(proxy.admin_port, "/metrics").body.decode()
        line = next(
            ln for ln in metrics.splitlines()
            if ln.startswith('lineage_sidecar_requests_total{status_class="2xx"}')
        )  # fmt: skip
        assert float(line.split()[-1]) >= 40
        workers = [
            p for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(p) == proxy.process.pid
            and b"spawn_main" in _cmdline(int(p.name))
        ]  # fmt: skip
        assert len(workers) == 2


def test_each_worker_reports_a_refused_policy_edit_in_readyz(
    echo_upstream: str, tmp_path: Path
) -> None:
    # The policy lives in the workers; /readyz is served by the supervisor. A broken edit
    # keeps the last good policy in every worker, and /readyz must say so for each.
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "model.conf").write_text(MODEL)
    (policies / "policy.csv").write_text(POLICY)
    (policies / "routes.yaml").write_text(ROUTES)
    extra = {
        "auth": {
            "jwt_issuers": [
                {"issuer": "https://idp.test", "audiences": ["a"], "shared_secret": "s" * 48}
            ]
        },
        "policy": {
            "model": str(policies / "model.conf"),
            "policies": [str(policies / "policy.csv")],
            "routes": str(policies / "routes.yaml"),
            "poll_interval": 0.1,
            "audit_log": str(tmp_path / "audit.jsonl"),
        },
    }
    with run_proxy(tmp_path, echo_upstream, proxy={"workers": 2}, extra=extra) as proxy:
        assert get(proxy.admin_port, "/readyz").status == 200
        (policies / "policy.csv").write_text(POLICY + "p, analyst\n")
        # Each worker notices the edit at its own poll: wait until both have said so.
        reasons = wait_for_readyz(
            proxy.admin_port, 200, "degraded: worker 0: ", "degraded: worker 1: "
        )
        assert reasons.count("policy.csv:10: p line has 1 fields") == 2  # file and line
        # And the metrics an alert is written on, summed over both workers.
        broken = _wait_for_metrics(
            proxy.admin_port,
            {
                'lineage_sidecar_policy_reloads_total{result="failed"}': 2.0,
                "lineage_sidecar_policy_reload_failing": 1.0,
            },
        )
        # Edited back to the version in force: recovered, and no reload (nothing swapped).
        (policies / "policy.csv").write_text(POLICY)
        wait_for_readyz(proxy.admin_port, 200, '"reasons":[]')
        ok = 'lineage_sidecar_policy_reloads_total{result="ok"}'
        _wait_for_metrics(
            proxy.admin_port,
            {
                ok: broken[ok],
                'lineage_sidecar_policy_reloads_total{result="failed"}': 2.0,
                "lineage_sidecar_policy_reload_failing": 0.0,
            },
        )


def _wait_for_metrics(admin_port: int, expected: dict[str, float]) -> dict[str, float]:
    """Every sample of /metrics once the ones in `expected` have those values (workers
    publish twice a second)."""
    deadline = time.monotonic() + 15
    while True:
        reply = get(admin_port, "/metrics")
        samples = {
            name: float(value)
            for line in reply.body.decode().splitlines()
            if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]
        }
        if reply.status == 200 and all(samples.get(k) == v for k, v in expected.items()):
            return samples
        found = {k: samples.get(k) for k in expected}
        assert time.monotonic() < deadline, (expected, found)
        time.sleep(0.1)


def _parent(proc: Path) -> int:
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[1])


def test_worker_that_dies_is_replaced(echo_upstream: str, tmp_path: Path) -> None:
    with run_proxy(tmp_path, echo_upstream, proxy={"workers": 2}) as proxy:
        children = [
            int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(p) == proxy.process.pid
        ]  # fmt: skip
        # Spawned workers run multiprocessing's spawn_main (the resource tracker does not).
        workers = [pid for pid in children if b"spawn_main" in _cmdline(pid)]
        assert len(workers) == 2
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            replaced = "starting a new one" in proxy.log.read_text()
            if replaced and get(proxy.admin_port, "/readyz").status == 200:
                break
            time.sleep(0.2)
        assert "starting a new one" in proxy.log.read_text()
        assert [get(proxy.port, f"/r/{i}").status for i in range(20)] == [200] * 20


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


def test_bad_config_exits_with_one_line_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"proxy": {"upstream": "http://127.0.0.1:1", "workers": "x"}}))
    result = run_cli("proxy", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "proxy.workers" in lines[0]


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli("proxy", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("nope.yaml: no such file")


def test_address_in_use_is_one_line(echo_upstream: str, tmp_path: Path) -> None:
    with run_proxy(tmp_path / "first", echo_upstream) as proxy:
        config = yaml.safe_load(proxy.config_path.read_text())
        config["admin"]["listen"] = "127.0.0.1:0"
        second = tmp_path / "second.yaml"
        second.write_text(yaml.safe_dump(config))
        result = run_cli("proxy", "--config", str(second), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"lineage-sidecar: cannot listen on 127.0.0.1:{proxy.port}: Address already in use"
    )


def test_check_flag_validates_without_starting(tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump({"proxy": {"upstream": "http://127.0.0.1:1"}}))
    result = run_cli("proxy", "--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 0
    assert "ok" in result.stdout


def test_agent_and_ingest_read_their_sections_of_one_file(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "proxy": {"upstream": "http://127.0.0.1:1"},
                "agent": {"spool_dir": str(tmp_path / "spool"), "sink": "kafka"},
                "kafka": {"bootstrap_servers": "127.0.0.1:9092", "topic": "lineage"},
                "store": {"dsn": "env:LS_PG_DSN"},
                "ingest": {"group_id": "lineage-ingesters"},
            }
        )
    )
    for command in ("proxy", "agent", "ingest"):
        result = run_cli(command, "--config", str(config), "--check", cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
    config.write_text(yaml.safe_dump({"agent": {"sink": "carrier-pigeon"}}))
    result = run_cli("agent", "--config", str(config), "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert "agent.sink" in result.stderr


def test_broken_policy_stops_a_multi_worker_proxy_with_one_line(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    repo = Path(__file__).resolve().parents[3] / "policies"
    (policies / "model.conf").write_text((repo / "model.conf").read_text())
    (policies / "routes.yaml").write_text((repo / "routes.yaml").read_text())
    (policies / "policy.csv").write_text("p, analyst, dataset:sales.*\n")  # missing columns
    config = tmp_path / "proxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "proxy": {"upstream": "http://127.0.0.1:1", "listen": "127.0.0.1:0", "workers": 2},
                "admin": {"listen": "127.0.0.1:0"},
                "auth": {"jwt_issuers": []},
                "policy": {
                    "model": str(policies / "model.conf"),
                    "policies": [str(policies / "policy.csv")],
                    "routes": str(policies / "routes.yaml"),
                    "audit_log": str(tmp_path / "audit.jsonl"),
                },
            }
        )
    )
    result = run_cli("proxy", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lineage-sidecar: policy: ")
    assert "policy.csv:1" in last


def test_agent_with_an_unresolvable_store_reference_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "agent": {
                    "spool_dir": str(tmp_path / "spool"),
                    "sink": "direct",
                    "admin_listen": "127.0.0.1:0",
                },
                "store": {"dsn": "env:LINEAGE_TEST_NO_SUCH_VARIABLE"},
            }
        )
    )
    result = run_cli("agent", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1]
        == "lineage-sidecar: environment variable 'LINEAGE_TEST_NO_SUCH_VARIABLE' is not set"
    )
    assert "Traceback" not in result.stderr

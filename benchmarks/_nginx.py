"""nginx instances of the benchmark: the upstream and the reverse-proxy baseline.

Each instance runs in the foreground (`daemon off`) from its own prefix directory with
its own config, pid file, logs and temp dirs, rendered from `benchmarks/nginx/*.template`,
so the system nginx service and its files are never involved.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from benchmarks._probe import TargetFailed, accepts, http_get
from benchmarks._procs import ManagedProcess, ProcessFailed, pinned, wait_until

TEMPLATES = Path(__file__).resolve().parent / "nginx"

# ~100 bytes of JSON: a typical small API answer. No '$' or "'" (nginx string syntax).
UPSTREAM_BODY = (
    b'{"ok":true,"service":"bench-upstream","items":[1,2,3,4,5],'
    b'"note":"fixed small response for wrk"}'
)


def render(template: str, values: Mapping[str, str]) -> str:
    """`template` with every `{{name}}` replaced; an unfilled placeholder is an error."""
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise TargetFailed(f"nginx template {template}: unfilled placeholder in\n{text}")
    return text


def nginx_binary() -> str:
    # /usr/sbin is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or "nginx"


class NginxInstance:
    """One nginx master (+1 worker) run from its own prefix directory, in the foreground."""

    def __init__(self, name: str, prefix: Path, template: str, values: Mapping[str, str]):
        self.name = name
        self.prefix = prefix
        for sub in ("logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        common = render("common.conf.template", {"prefix": str(prefix)})
        config = render(template, {"common": common, "prefix": str(prefix), **values})
        self.config_file = prefix / "nginx.conf"
        self.config_file.write_text(config)
        self.error_log = prefix / "logs" / "error.log"
        self.process: ManagedProcess | None = None

    def start(self, cpu: int | None, port: int) -> None:
        """Start pinned to `cpu` and wait until `port` accepts connections."""
        argv = pinned(
            [nginx_binary(), "-p", str(self.prefix), "-c", str(self.config_file),
             "-e", str(self.error_log)],
            cpu,
        )  # fmt: skip
        self.process = ManagedProcess(
            self.name, argv, self.prefix / "logs", extra_logs=[self.error_log]
        )
        try:
            self.process.start()
        except ProcessFailed as exc:
            raise TargetFailed(str(exc)) from exc
        process = self.process
        if not wait_until(lambda: accepts(port), timeout_s=10.0, alive=process.running):
            what = f"not listening on port {port} after 10 s" if process.running() else "exited"
            raise TargetFailed(process.failure_report(what))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None and self.process.running() else []

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def failure_report(self, what: str) -> str:
        return what if self.process is None else self.process.failure_report(what)


def start_upstream(workdir: Path, cpu: int | None, port: int) -> NginxInstance:
    """The upstream every target sends its requests to (started once per run)."""
    upstream = NginxInstance(
        "upstream",
        workdir / "nginx-upstream",
        "upstream.conf.template",
        {"port": str(port), "body": UPSTREAM_BODY.decode()},
    )
    upstream.start(cpu, port)
    # The port may accept connections without being ours (a port race): check the answer.
    url = f"http://127.0.0.1:{port}/"
    if not wait_until(lambda: http_get(url) == (200, UPSTREAM_BODY), timeout_s=5.0,
                      alive=upstream.running):  # fmt: skip
        what = f"{url} does not answer 200 with the fixed body (last: {http_get(url)!r})"
        upstream.stop()
        raise TargetFailed(upstream.failure_report(what))
    return upstream

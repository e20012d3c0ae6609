"""`lineage-sidecar`: the one console script, a subcommand per process or tool.

Every subcommand takes `--config FILE`; a configuration that cannot be used ends the
command with exit status 2 and one line on standard error naming the field. For the proxy
that includes a file it names (certificate, users, policy, routes) that cannot be read,
with `--check` as at a real start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from lineage_sidecar.config import ConfigError, check_files, load

EXIT_CONFIG = 2


def _cmd_proxy(args: argparse.Namespace) -> int:
    config = load(args.config)
    if args.command == "api" and config.api is None:
        raise ConfigError(f"{args.config}: api: section required for 'lineage-sidecar api'")
    # Before --check answers and before anything starts: a file named but missing is a
    # configuration error (exit 2, one line), not a failure halfway through the start.
    check_files(config, args.config)
    if args.check:
        print(f"{args.config}: ok")
        return 0
    from proxy.supervisor import run

    run(config)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    from agent.agent import run_agent
    from agent.config import AgentProcessConfig
    from lineage_sidecar.config import AGENT_SECTIONS, load_process

    config = load_process(args.config, AgentProcessConfig, AGENT_SECTIONS)
    assert isinstance(config, AgentProcessConfig)
    return _serve(args, run_agent(config))


def _cmd_ingest(args: argparse.Namespace) -> int:
    from agent.config import IngestProcessConfig
    from agent.ingest import run_ingester
    from lineage_sidecar.config import INGEST_SECTIONS, load_process

    config = load_process(args.config, IngestProcessConfig, INGEST_SECTIONS)
    assert isinstance(config, IngestProcessConfig)
    return _serve(args, run_ingester(config))


def _serve(args: argparse.Namespace, service: Coroutine[Any, Any, None]) -> int:
    """Run an agent-side service until SIGTERM/SIGINT (or only validate with --check)."""

    if args.check:
        service.close()
        print(f"{args.config}: ok")
        return 0
    from agent.process import serve

    return serve(service, prog="lineage-sidecar")


def _cmd_demo(args: argparse.Namespace) -> int:
    from lineage_sidecar.demo import run_demo

    return run_demo(
        listen=args.listen,
        admin=args.admin,
        api_listen=args.api,
        state_dir=args.state_dir,
        config_path=args.config,
    )


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.audit import GENESIS, verify

    try:
        result = verify([Path(p) for p in args.files], start=args.start or GENESIS)
    except OSError as exc:
        print(f"lineage-sidecar: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"audit chain broken: {result.problem}", file=sys.stderr)
        return 1
    print(f"ok: {result.lines} lines, last hash {result.last_hash}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lineage-sidecar",
        description="Authorization proxy and lineage agent that run beside a data service.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def service(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        description: str,
        config: str,
    ) -> None:
        command = commands.add_parser(name, help=help, description=description)
        command.add_argument("--config", required=True, help=config)
        command.add_argument(
            "--check", action="store_true", help="validate the configuration and exit"
        )
        command.set_defaults(func=func)

    service(
        "proxy",
        _cmd_proxy,
        "run the TLS reverse proxy in front of a data service",
        "Run the proxy until SIGINT/SIGTERM, which drain in-flight requests.",
        "YAML configuration file",
    )
    service(
        "agent",
        _cmd_agent,
        "turn the proxy's capture spool into lineage and ship it (Kafka or direct)",
        "Tail the spool, derive OpenLineage events, encrypt and send them; the spool "
        "position advances only after the sink acknowledged. SIGTERM stops cleanly.",
        "YAML file (sections agent, derive, kafka, keys, store)",
    )
    service(
        "ingest",
        _cmd_ingest,
        "consume lineage from Kafka into PostgreSQL",
        "Consumer group: decrypt, write in batches, commit offsets after the database; "
        "unreadable messages go to the dead-letter table.",
        "YAML file (sections ingest, kafka, keys, store)",
    )
    service(
        "api",
        _cmd_proxy,
        "serve the lineage API behind the proxy's authentication and policies",
        "Run a proxy whose only backend is the lineage API (config: proxy without "
        "upstream, auth, policy, api.store_dsn).",
        "YAML configuration file",
    )

    demo = commands.add_parser(
        "demo",
        help="run the whole product on this machine with embedded defaults",
        description=(
            "Start a sample data service (Datasette) behind the proxy with TLS, print what to "
            "try, write the endpoints to <state-dir>/endpoints.json; Ctrl-C stops it all."
        ),
    )
    demo.add_argument("--config", help="optional YAML file whose sections override the demo's")
    demo.add_argument("--listen", default="127.0.0.1:8443", help="proxy address (host:port)")
    demo.add_argument("--admin", default="127.0.0.1:9901", help="admin address (host:port)")
    demo.add_argument("--api", default="127.0.0.1:8444", help="lineage API address (host:port)")
    demo.add_argument("--state-dir", default="var/demo", help="where the demo keeps its files")
    demo.set_defaults(func=_cmd_demo)

    from lineage_sidecar.policycmd import add_policy_commands

    policy = commands.add_parser(
        "policy",
        help="lint, test and explain Casbin policies and route files",
        description="Work on policy files offline: the same code the proxy decides with.",
    )
    add_policy_commands(
        policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    )

    from lineage_sidecar.keyscmd import add_keys_command

    add_keys_command(commands)

    audit = commands.add_parser("audit", help="work with the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_commands.add_parser(
        "verify",
        help="check the hash chain of audit files (rotated files in order)",
        description="Exit 0 when the chain holds, 1 naming the first broken line.",
    )
    verify.add_argument("files", nargs="+", help="audit files, oldest first")
    verify.add_argument(
        "--start", help="hash the first file continues from (the last hash of an older file)"
    )
    verify.set_defaults(func=_cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"lineage-sidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Start-up failures that operators fix (address in use, unreadable certificate)
        # end with one line, not a traceback.
        from proxy.listener import StartupError

        if isinstance(exc, StartupError):
            print(f"lineage-sidecar: {exc}", file=sys.stderr)
            return 1
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())

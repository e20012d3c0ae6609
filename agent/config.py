"""Configuration of the lineage agent, its sinks and the ingester: frozen, documented structs.

Each field is documented once, here, through `msgspec.Meta(description=...)`; the main
configuration (`lineage_sidecar.config`) embeds these sections and the configuration
reference is generated from them. `check()` methods raise `ValueError` naming the field
for combinations a type alone cannot rule out.

`AgentProcessConfig` and `IngestProcessConfig` are what `python -m agent.agent` and
`python -m agent.ingest` read on their own (one YAML or JSON file); the CLI builds the
same objects from the main file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import yaml

from agent.derive import DeriveConfig

T = TypeVar("T")

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
Listen = Annotated[str, msgspec.Meta(pattern=r"^\S+:\d{1,5}$")]

_LISTEN_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d{1,5})$"
)


def parse_listen(value: str) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`) into a bindable host and port, or raise ValueError.

    Here, not in `lineage_sidecar.config`, so that the agent's own admin listener is
    validated by the same rule as the proxy's without the agent importing the proxy."""
    match = _LISTEN_RE.match(value)
    if match is None:
        raise ValueError(f"listen address must be host:port or [ipv6]:port, got {value!r}")
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"{match['v6']!r} is not an IPv6 address") from None
        return match["v6"], port
    return match["host"], port


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


# A string that holds a `file:` / `env:` reference to a secret; the configuration
# reference marks such fields *secret* (lineage_sidecar/configdoc.py reads this).
SECRET_REFERENCE = msgspec.Meta(extra={"secret": True})


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The agent: tails the proxy's spool, derives lineage, batches and ships it."""

    spool_dir: Annotated[
        str,
        _doc(
            "The proxy's spool root; the agent reads every worker subdirectory in it "
            "(`w0`, `w1`, ...) and keeps its checkpoint there."
        ),
    ] = "var/spool"
    sink: Annotated[
        Literal["kafka", "direct"],
        _doc(
            "Where batches go: `kafka` (encrypted, to the ingester through a topic) or "
            "`direct` (straight into PostgreSQL in this process, for a single machine)."
        ),
    ] = "direct"
    read_records: Annotated[
        int,
        msgspec.Meta(ge=1, le=100_000),
        _doc("Capture records read from one worker spool at a time."),
    ] = 2000
    max_batch_events: Annotated[
        int,
        msgspec.Meta(ge=1, le=1_000_000),
        _doc("A batch is sent once it holds this many events."),
    ] = 5000
    max_batch_bytes: Annotated[
        int,
        msgspec.Meta(ge=1024, le=64 << 20),
        _doc("...or once its encoded events reach this many bytes."),
    ] = 4 << 20
    linger: Annotated[
        Seconds,
        _doc("...or once its oldest event has waited this long (seconds)."),
    ] = 0.2
    poll_interval: Annotated[
        Seconds,
        _doc("How often an idle spool is looked at again (seconds)."),
    ] = 0.05
    tick_interval: Annotated[
        Seconds,
        _doc(
            "How often idle runs are completed by the wall clock, new worker spools are "
            "discovered and the lag gauge is refreshed (seconds)."
        ),
    ] = 1.0
    retry_initial: Annotated[
        Seconds, _doc("First wait after a failed send; doubles on each failure (seconds).")
    ] = 0.2
    retry_max: Annotated[Seconds, _doc("Longest wait between two send attempts (seconds).")] = 10.0
    complete_runs_on_stop: Annotated[
        bool,
        _doc(
            "Complete every open run when the agent stops. Off by default: open runs are "
            "kept in the checkpoint and continue after a restart."
        ),
    ] = False
    admin_listen: Annotated[
        Listen | None,
        _doc(
            "Address of the agent's admin listener (`/healthz`, `/readyz`, `/metrics`), "
            "host:port; keep it on loopback or a private network. null: no listener."
        ),
    ] = "127.0.0.1:9902"

    def check(self) -> None:
        """Raise ValueError naming the field when the combination cannot work."""
        if self.retry_max < self.retry_initial:
            raise ValueError("agent.retry_max must be at least agent.retry_initial")
        if self.admin_listen is not None:
            try:
                parse_listen(self.admin_listen)
            except ValueError as exc:
                raise ValueError(f"agent.admin_listen: {exc}") from None


class KafkaConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Kafka topic between agents and ingesters, and how the producer uses it."""

    bootstrap_servers: Annotated[
        str, _doc("Comma-separated host:port list of Kafka brokers to bootstrap from.")
    ] = "127.0.0.1:9092"
    topic: Annotated[
        str,
        msgspec.Meta(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$"),
        _doc("Topic the sealed batches are written to and read from."),
    ] = "lineage.events"
    client_id: Annotated[str, _doc("Kafka client id, visible in broker logs and quotas.")] = (
        "lineage-sidecar"
    )
    key_buckets: Annotated[
        int,
        msgspec.Meta(ge=1, le=65536),
        _doc(
            "Message keys are one of this many opaque buckets of a dataset (or run) hash: "
            "a dataset's events share a key, hence a partition and their order, while the "
            "key reveals nothing about the name. Keep it at or above the partition count."
        ),
    ] = 64
    compression: Annotated[
        Literal["gzip", "none"],
        _doc(
            "Producer compression. Messages are ciphertext, which does not compress, so "
            "`gzip` only costs CPU (a seventh of the agent's in the pipeline benchmark) and "
            "makes messages a little larger; it is there for brokers whose topics must "
            "be compressed. Compressing before encrypting would let message sizes reveal "
            "content, so the agent does not."
        ),
    ] = "none"
    linger_ms: Annotated[
        int,
        msgspec.Meta(ge=0, le=10_000),
        _doc("Producer linger: how long a Kafka batch may wait for more messages (ms)."),
    ] = 5
    max_message_bytes: Annotated[
        int,
        msgspec.Meta(ge=1 << 14, le=256 << 20),
        _doc(
            "Largest sealed message (bytes): batches are cut into parts below it. Keep it "
            "under the topic's max.message.bytes (broker default about 1 MiB)."
        ),
    ] = 900 << 10
    max_request_bytes: Annotated[
        int,
        msgspec.Meta(ge=1 << 16, le=256 << 20),
        _doc("Largest produce request (bytes); the broker's message.max.bytes must allow it."),
    ] = 8 << 20
    request_timeout: Annotated[
        Seconds, _doc("Producer request timeout: a broker answer later than this fails it.")
    ] = 30.0
    send_timeout: Annotated[
        Seconds,
        _doc(
            "Longest a whole batch may take to be acknowledged before the send counts as "
            "failed and is retried (seconds)."
        ),
    ] = 60.0

    def check(self) -> None:
        if self.max_message_bytes > self.max_request_bytes:
            raise ValueError("kafka.max_message_bytes must not exceed kafka.max_request_bytes")


_VAULT_KEY_NAME = re.compile(r"^\w(?:[\w.@-]*\w)?$")  # Vault's own rule for key names
_VAULT_MOUNT = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$")


class VaultConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """HashiCorp Vault (or OpenBao) Transit: the key-encryption key never leaves Vault; the
    agent and the ingester send it each batch's data key to encrypt or decrypt."""

    address: Annotated[
        str,
        _doc(
            "Vault's URL, `https://vault.example:8200`. `http://` sends the token and the data "
            "keys in clear: use it on loopback only (a warning is logged otherwise)."
        ),
    ]
    token: Annotated[
        str,
        SECRET_REFERENCE,
        _doc(
            "Vault token as a `file:PATH` or `env:NAME` reference, never inline. A file is "
            "re-read on every call, so a token renewed into it (Vault Agent) is used without "
            "a restart. Agents and ingesters need only `update` on `<mount>/encrypt/<key_name>` "
            "and `<mount>/decrypt/<key_name>` (docs/security.md)."
        ),
    ]
    mount: Annotated[str, _doc("Path the Transit secrets engine is mounted at.")] = "transit"
    key_name: Annotated[
        str,
        _doc(
            "The Transit key that wraps data keys. Agents and the ingesters reading their "
            "batches must name the same mount and key."
        ),
    ] = "lineage"
    namespace: Annotated[
        str | None, _doc("Vault Enterprise / OpenBao namespace; null for the root namespace.")
    ] = None
    ca_file: Annotated[
        str | None,
        _doc("PEM file of the CA that signed Vault's certificate; null: the system's CAs."),
    ] = None
    tls_verify: Annotated[
        bool, _doc("Verify Vault's certificate. Turn off only to debug, never in production.")
    ] = True
    timeout: Annotated[Seconds, _doc("Longest wait for one answer from Vault (seconds).")] = 5.0

    def check(self) -> None:
        """Raise ValueError naming the field when the value cannot work."""
        parts = urlsplit(self.address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"keys.vault.address: expected https://host[:port], got {self.address!r}"
            )
        if parts.username is not None or parts.query or parts.fragment:
            raise ValueError("keys.vault.address: no user, query or fragment in Vault's URL")
        try:
            _ = parts.port  # raises ValueError when out of range
        except ValueError as exc:
            raise ValueError(f"keys.vault.address: {exc}") from None
        scheme, _, target = self.token.partition(":")
        if scheme not in ("file", "env") or not target:
            raise ValueError(
                "keys.vault.token: give a file:PATH or env:NAME reference, not the token itself"
            )
        if not _VAULT_MOUNT.match(self.mount):
            raise ValueError(f"keys.vault.mount: {self.mount!r} is not a mount path (e.g. transit)")
        if not _VAULT_KEY_NAME.match(self.key_name):
            raise ValueError(
                f"keys.vault.key_name: {self.key_name!r} is not a Transit key name "
                "(letters, digits, '_', '-', '.', '@')"
            )
        if self.ca_file is not None and not self.tls_verify:
            raise ValueError("keys.vault.ca_file: set, but keys.vault.tls_verify is false")
        if self.ca_file is not None and parts.scheme != "https":
            raise ValueError("keys.vault.ca_file: set, but keys.vault.address is not https://")


class KeysConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the key-encryption keys that wrap each batch's data key live."""

    provider: Annotated[
        Literal["local", "vault"],
        _doc(
            "`local`: a keyring file on this machine (`keys.keyring`). `vault`: a Vault "
            "Transit key (`keys.vault`); the key never leaves Vault."
        ),
    ] = "local"
    keyring: Annotated[
        str,
        _doc(
            "Keyring file (0600), created with one fresh key when absent. Only with "
            "`provider: local`."
        ),
    ] = "var/keys/keyring.json"
    vault: Annotated[
        VaultConfig | None, _doc("Vault Transit; required with `provider: vault`.")
    ] = None

    def check(self) -> None:
        """Raise ValueError naming the field when the combination cannot work."""
        if self.provider == "vault" and self.vault is None:
            raise ValueError("keys.vault: required when keys.provider is vault")
        if self.provider == "local" and self.vault is not None:
            # A forgotten `provider: vault` would otherwise seal with a new local keyring.
            raise ValueError("keys.vault: set, but keys.provider is local (set provider: vault)")
        if self.vault is not None:
            self.vault.check()


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The PostgreSQL lineage store."""

    dsn: Annotated[
        str,
        SECRET_REFERENCE,
        _doc(
            "PostgreSQL DSN, or a `file:PATH` / `env:NAME` reference to one (it holds a password)."
        ),
    ] = "env:LS_PG_DSN"
    max_connections: Annotated[
        int, msgspec.Meta(ge=1, le=100), _doc("Connections in the writer's pool at most.")
    ] = 4
    migrate: Annotated[bool, _doc("Apply pending schema migrations at start.")] = True


class IngestConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ingester: consumes sealed batches, opens them and writes them to the store."""

    group_id: Annotated[
        str, _doc("Kafka consumer group; ingesters sharing it split the partitions.")
    ] = "lineage-ingester"
    instance_id: Annotated[
        str | None,
        _doc(
            "Static group membership: an ingester restarted with the same id takes its "
            "partitions back at once instead of waiting for a rebalance. Unique per "
            "ingester (e.g. the pod name); unset for dynamic membership."
        ),
    ] = None
    session_timeout: Annotated[
        Annotated[float, msgspec.Meta(ge=1, le=3600)],
        _doc(
            "An ingester silent this long is presumed dead and its partitions move to the "
            "others (seconds; the broker's group.min/max.session.timeout.ms bound it)."
        ),
    ] = 10.0
    auto_offset_reset: Annotated[
        Literal["earliest", "latest"],
        _doc("Where a group with no committed offset starts. `earliest` loses nothing."),
    ] = "earliest"
    max_poll_records: Annotated[
        int,
        msgspec.Meta(ge=1, le=100_000),
        _doc("Messages fetched, written in one transaction and committed together, at most."),
    ] = 500
    poll_timeout: Annotated[Seconds, _doc("How long one fetch waits for messages (seconds).")] = 0.5
    max_message_bytes: Annotated[
        int,
        msgspec.Meta(ge=1 << 10, le=256 << 20),
        _doc("A message above this is dead-lettered unopened (bytes)."),
    ] = 64 << 20
    retry_initial: Annotated[
        Seconds,
        _doc("First wait after the store or key provider failed; doubles (seconds)."),
    ] = 0.2
    retry_max: Annotated[
        Seconds, _doc("Longest wait between two attempts at the same messages (seconds).")
    ] = 10.0
    admin_listen: Annotated[
        Listen | None,
        _doc(
            "Address of the ingester's admin listener (`/healthz`, `/readyz`, `/metrics`), "
            "host:port; keep it on loopback or a private network. null: no listener."
        ),
    ] = "127.0.0.1:9903"

    def check(self) -> None:
        if self.retry_max < self.retry_initial:
            raise ValueError("ingest.retry_max must be at least ingest.retry_initial")
        if self.admin_listen is not None:
            try:
                parse_listen(self.admin_listen)
            except ValueError as exc:
                raise ValueError(f"ingest.admin_listen: {exc}") from None


class AgentProcessConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The file `python -m agent.agent --config FILE` reads."""

    agent: AgentConfig = AgentConfig()
    derive: Annotated[
        DeriveConfig, _doc("Lineage derivation: run correlation, redaction, SQL limits.")
    ] = DeriveConfig()
    kafka: KafkaConfig = KafkaConfig()
    keys: KeysConfig = KeysConfig()
    store: StoreConfig = StoreConfig()


class IngestProcessConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The file `python -m agent.ingest --config FILE` reads."""

    ingest: IngestConfig = IngestConfig()
    kafka: KafkaConfig = KafkaConfig()
    keys: KeysConfig = KeysConfig()
    store: StoreConfig = StoreConfig()


# --- reading configuration files ------------------------------------------------------------
# Every configuration file and `file:` secret the product reads goes through these, here
# because both the agent's own entry points and `lineage_sidecar.config` use them.

CONFIG_MAX_BYTES: Final = 1_000_000
# A PEM key or a DSN is a few KB; this leaves room for a certificate chain in one secret.
SECRET_MAX_BYTES: Final = 64 * 1024

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRefused(ValueError):
    """A file that is not read: not a regular file. The message completes "PATH: "."""


class FileTooLarge(FileRefused):
    """A regular file larger than the limit it was read with."""


class FileNotPrivate(FileRefused):
    """A file read as private that group or others may access; `mode` is its mode."""

    def __init__(self, mode: int) -> None:
        super().__init__(f"mode {mode:04o} lets group or others access it")
        self.mode = mode


def read_regular_file(path: str | os.PathLike[str], limit: int, *, private: bool = False) -> bytes:
    """The content of a regular file (symlinks followed) of at most `limit` bytes, and with
    `private` one that only its owner may access.

    Raises FileRefused for anything else; OSError (missing, not permitted) is left to the
    caller."""
    # O_NONBLOCK: opening a FIFO that has no writer would otherwise wait forever. It has
    # no effect on the regular file that is then read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        # fstat on the open file: the mode checked is the mode of what is read.
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
            raise FileRefused(f"not a regular file ({kind})")
        if private and mode & 0o077:
            raise FileNotPrivate(stat.S_IMODE(mode))
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit} bytes")
    return data


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives the same key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping. YAML requires keys to be
    unique, but PyYAML keeps the last one silently: a second `proxy:` section further
    down would replace the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *defaults` merges keys that the mapping's own keys may override.
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_lines.get(key)
            except TypeError:
                continue  # an unhashable key, refused by the constructor below
            if first is not None:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first})",
                    key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_file(path: str | Path, kind: type[T]) -> T:
    """Parse a YAML (or JSON) file into `kind`; ValueError names the file and the field."""
    try:
        text = read_regular_file(path, CONFIG_MAX_BYTES).decode("utf-8")
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506  # a SafeLoader
    except (OSError, UnicodeDecodeError, FileRefused) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    try:
        config = msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for section in ("agent", "ingest", "kafka", "keys"):
        check = getattr(getattr(config, section, None), "check", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    return config

"""`lineage-sidecar keys list | rotate`: the key-encryption keys, from a shell.

With a keyring path (or `--config FILE` whose `keys.provider` is `local`), `rotate` adds a
new active key to the keyring file and keeps the old ones. With `--config FILE` and
`keys.provider: vault`, `rotate` rotates the Transit key in Vault (a new key version, which
Vault encrypts with from then on) and `list` shows the key's versions. Either way batches
sealed before keep opening, and running agents and ingesters need no restart.

The Vault token in the configuration is the agent's, allowed only to encrypt and decrypt;
listing needs `read` on `<mount>/keys/<key>` and rotating `update` on
`<mount>/keys/<key>/rotate`, so an operator passes their own with `--vault-token`.

Exit status: 0 done; 1 the keyring or Vault refused or could not be reached; 2 a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import sys

from agent.config import KeysConfig
from agent.keys import (
    KeyProviderError,
    LocalKeyring,
    VaultTransitKeyProvider,
    open_key_provider,
)

__all__ = ["add_keys_command"]


def add_keys_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare `keys` among the CLI's subcommands."""
    keys = commands.add_parser(
        "keys",
        help="list or rotate the key-encryption keys that wrap lineage data keys",
        description=(
            "rotate adds a new active key-encryption key (local keyring) or key version "
            "(Vault Transit) and keeps the old ones, so batches sealed before still open; "
            "agents and ingesters pick the new key up by themselves."
        ),
    )
    keys.add_argument("action", choices=["list", "rotate"])
    keys.add_argument(
        "keyring", nargs="?", help="keyring file (keys.keyring); or give --config instead"
    )
    keys.add_argument(
        "--config", help="YAML file whose keys section names the provider (local or vault)"
    )
    keys.add_argument(
        "--vault-token",
        metavar="REF",
        help="operator token for Vault as file:PATH or env:NAME (default: keys.vault.token)",
    )
    keys.set_defaults(func=_cmd_keys, parser=keys)


def _cmd_keys(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if (args.keyring is None) == (args.config is None):
        parser.error("give either a keyring file or --config FILE")
    token = args.vault_token
    if token is not None and not token.startswith(("file:", "env:")):
        parser.error("--vault-token: give a file:PATH or env:NAME reference, not the token")
    try:
        if args.config is None:
            if token is not None:
                parser.error("--vault-token needs --config with keys.provider: vault")
            return _local(LocalKeyring(args.keyring, create=args.action == "rotate"), args.action)
        keys = _keys_section(args.config)
        if keys.provider == "local" and token is not None:
            parser.error("--vault-token: keys.provider is local in the configuration")
        provider = open_key_provider(
            keys,
            create=args.action == "rotate",
            token_reference=token,
            override_name="--vault-token",
        )
        if isinstance(provider, LocalKeyring):
            return _local(provider, args.action)
        return _vault(provider, args.action)
    except (KeyProviderError, OSError) as exc:
        print(f"lineage-sidecar: {exc}", file=sys.stderr)
        return 1


def _keys_section(path: str) -> KeysConfig:
    """The checked `keys` section of a configuration file (ConfigError otherwise)."""
    from agent.config import AgentProcessConfig
    from lineage_sidecar.config import load_process

    return load_process(path, AgentProcessConfig, ("keys",)).keys


def _local(keyring: LocalKeyring, action: str) -> int:
    if action == "rotate":
        new = keyring.rotate()
        print(f"new active key {new} ({len(keyring.key_ids)} keys; older ones open old batches)")
        return 0
    for key_id in keyring.key_ids:
        marker = " (active)" if key_id == keyring.active_key_id else ""
        print(f"{key_id}{marker}")
    return 0


def _vault(provider: VaultTransitKeyProvider, action: str) -> int:
    try:
        if action == "rotate":
            latest = provider.rotate()
            print(
                f"new active version v{latest} of {provider.active_key_id} (older versions "
                "open old batches until the key's min_decryption_version passes them)"
            )
            return 0
        versions = provider.read_versions()
    except KeyProviderError as exc:
        if "refused" not in str(exc):
            raise
        key = provider.transit_key_path
        raise KeyProviderError(
            f"{exc}; list needs read on {key}, rotate needs update on {key}/rotate: "
            "pass an operator token with --vault-token",
            retriable=False,
        ) from None
    for version, created in versions.created.items():
        if version == versions.latest:
            marker = " (active)"
        elif version < versions.min_decryption:
            marker = " (retired: no longer decrypts)"
        else:
            marker = ""
        print(f"{provider.active_key_id} v{version} {created}{marker}".rstrip())
    return 0

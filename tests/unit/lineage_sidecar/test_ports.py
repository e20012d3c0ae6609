"""Free ports for servers started as processes: never where outgoing connections go."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lineage_sidecar.ports import LOWEST, ephemeral_range, free_port


def test_ports_come_from_below_the_ephemeral_range_and_can_be_bound() -> None:
    low, _ = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    for port in ports:
        assert LOWEST <= port < low
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


def test_a_listening_port_is_never_handed_out() -> None:
    # Fill the low range's neighbourhood of one answer: the port it gave, once taken by a
    # listener, cannot come back (handed out once), and a span needs every port free.
    first = free_port(span=3)
    with socket.socket() as server:
        server.bind(("127.0.0.1", first + 1))
        server.listen()
        for _ in range(200):
            port = free_port(span=3)
            assert not set(range(port, port + 3)) & {first, first + 1, first + 2}


def test_outgoing_connections_do_not_take_the_chosen_ports() -> None:
    # The failure this module exists for: a port chosen by the kernel (bind to 0) was given
    # to an outgoing connection before the server bound it. Connections' local ports come
    # from the ephemeral range, which free_port stays out of.
    chosen = {free_port() for _ in range(20)}
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(256)
        address = server.getsockname()
        clients = [socket.create_connection(address) for _ in range(200)]
        try:
            local_ports = {client.getsockname()[1] for client in clients}
        finally:
            for client in clients:
                client.close()
    assert not chosen & local_ports


def test_span_must_be_positive() -> None:
    with pytest.raises(ValueError, match="span"):
        free_port(span=0)


@pytest.mark.parametrize("text", ["", "abc", "1", "1 2 3", "\x00"])
def test_an_unreadable_range_file_gives_linux_default(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    assert ephemeral_range(path) == (32_768, 60_999)
    assert ephemeral_range(tmp_path / "missing") == (32_768, 60_999)


def test_the_range_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t50000\n")
    assert ephemeral_range(path) == (40_000, 50_000)

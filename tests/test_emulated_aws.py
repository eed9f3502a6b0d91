"""The rehearsal's emulated AWS where pytest-xdist runs it: deep temporary folders, two at once."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from rehearsal.emulated_aws import EmulatedAws
from rehearsal.throttling import ThrottledMotoServer, random_share


def test_a_deep_tmpdir_still_gets_the_nodes_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rehearsal under an xdist worker's TMPDIR: the socket's path would pass sun_path's 108
    bytes there. Two emulated AWSs side by side, each with a socket of its own, gone at stop."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    first, second = EmulatedAws().start(), EmulatedAws().start()
    try:
        assert first.socket_path != second.socket_path
        for aws in (first, second):
            assert len(str(aws.socket_path)) < 108
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(aws.socket_path))
            assert "Buckets" in aws.client("s3").list_buckets()  # moto's backends serve it
    finally:
        first.stop()
        second.stop()
    assert not first.socket_folder.exists() and not second.socket_folder.exists()


def test_a_server_that_cannot_listen_fails_at_once(tmp_path: Path) -> None:
    """moto's start() waits for its server thread: a bind that fails must not hang it."""
    too_long = tmp_path / ("x" * 120) / "aws.sock"
    server = ThrottledMotoServer(f"unix://{too_long}", 0, random_share(0.0, seed=1))
    with pytest.raises(RuntimeError, match="cannot listen on unix://"):
        server.start()

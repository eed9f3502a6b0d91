"""Ships this node's log files to CloudWatch Logs, one stream per node.

    python -m userdata.log_shipper --log-group GROUP [--stream NAME] [--region R]
        --file PATH [--file PATH ...] [--interval 5] [--max-buffer 10000] [--state-file PATH]

Its own process: training writes its output to files and this only reads them, so a slow or
unreachable CloudWatch can never stall or crash training. Every line of every file becomes one
event (the time it was read, the line itself). The main thread reads the files; a second
thread sends. While CloudWatch cannot be reached, at most --max-buffer lines wait: the oldest
go first, and one note in their place says how many. SIGTERM or SIGINT: the rest of the files
is read, sent for at most FLUSH_SECONDS, and the shipper exits 0.

With --state-file, how far each file has been sent is kept there, written only once CloudWatch
has accepted those lines: a shipper started again (a reboot) goes on from there, so a line is
sent again only if its batch was on its way at a crash, and none is lost. A file truncated or
replaced in the meantime is read from its start.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from userdata.errors import AgentError
from userdata.imds import Imds, read_identity
from userdata.log_sender import Buffer, Shipper
from userdata.log_tail import Offsets, Tail, log
from userdata.run_layout import log_stream

POLL_SECONDS = 0.2  # between looks at files with nothing new
FLUSH_SECONDS = 5.0  # at stop: the most time spent reading the rest and sending it
IDENTITY_WAIT_SECONDS = 60.0  # how long IMDS may take to say who this node is
CALL_TIMEOUT_SECONDS = 5.0  # connect and read timeout of each CloudWatch call


def stream_and_region(
    stream: str | None,
    region: str | None,
    imds: Imds,
    wait: float = IDENTITY_WAIT_SECONDS,
    stop: threading.Event | None = None,
    stack: str = "",
) -> tuple[str, str | None]:
    """The stream (`<stack>/node-<rank>`, the rank from the instance tags) and region not given,
    from IMDS, which is asked again for `wait` seconds (or until `stop`). A rank that cannot be
    read gives the instance id, so the logs of a node whose tags are broken still arrive."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + wait
    while not (stream and region):
        try:
            if stream:
                region = imds.require("placement/region")
            else:
                identity = read_identity(imds)
                stream = log_stream(identity.node_rank, stack)
                region = region or identity.region
        except AgentError as error:
            left = deadline - time.monotonic()
            if left > 0 and not stop.wait(min(left, 2.0)):
                continue
            if not stream:
                log(f"no node rank ({error}): the stream is named by the instance id")
            try:
                stream = stream or imds.require("instance-id")
                region = region or imds.require("placement/region")
            except AgentError as again:
                log(f"IMDS cannot say who this node is ({again})")
                stream = stream or socket.gethostname()
            break
    return stream, region  # region None: boto3's own (AWS_REGION, AWS_DEFAULT_REGION...)


def logs_client(region: str | None) -> Any:
    """Short timeouts and one retry: a call never blocks for minutes. Honours
    AWS_ENDPOINT_URL (boto3 reads it), so tests stay local."""
    config = Config(
        connect_timeout=CALL_TIMEOUT_SECONDS,
        read_timeout=CALL_TIMEOUT_SECONDS,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("logs", region_name=region, config=config)


def ship(
    args: argparse.Namespace, buffer: Buffer, offsets: Offsets, finishing: threading.Event
) -> None:
    """The sending thread: who this node is, then send until finished."""
    try:
        stream, region = args.stream, args.region
        if not (stream and region):
            stream, region = stream_and_region(
                stream, region, Imds(), stop=finishing, stack=args.stack
            )
        client = logs_client(region)
    except Exception as error:  # no region anywhere, say: the files are still read
        log(f"nothing will be sent: {error}")
        return
    log(f"sending {', '.join(args.file)} to {args.log_group}/{stream}")
    shipper = Shipper(client, args.log_group, stream, buffer, args.interval, on_sent=offsets.commit)
    shipper.run(finishing)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m userdata.log_shipper",
        description="Send the lines of log files to a CloudWatch Logs stream as they come.",
    )
    parser.add_argument("--log-group", required=True)
    parser.add_argument(
        "--stream",
        help="the stream (default: <stack>/node-<rank>, the rank from the instance tags)",
    )
    parser.add_argument(
        "--stack", default="", help="the cluster's stack: its streams in the shared log group"
    )
    parser.add_argument("--region", help="default: the instance's region, from IMDS")
    parser.add_argument(
        "--file",
        action="append",
        required=True,
        help="a file to follow from its beginning (again for more); it may appear later",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between sends")
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=10_000,
        help="lines kept while CloudWatch cannot be reached; beyond it the oldest go",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        help="where how far each file was sent is kept, to go on from there after a restart",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be above 0")
    if args.max_buffer < 1:
        parser.error("--max-buffer must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    buffer = Buffer(args.max_buffer)
    offsets = Offsets(args.state_file)
    saved = offsets.load()
    tails = [Tail(Path(path), saved.get(str(Path(path)))) for path in args.file]
    finishing = threading.Event()
    # A daemon: a send stuck at stop cannot hold the exit up.
    sender = threading.Thread(target=ship, args=(args, buffer, offsets, finishing), daemon=True)
    sender.start()
    while not stop.is_set():
        for tail in tails:
            for message in tail.read():
                buffer.add(message, mark=tail.mark())
        if all(tail.caught_up for tail in tails):
            stop.wait(POLL_SECONDS)
    deadline = time.monotonic() + FLUSH_SECONDS
    for tail in tails:
        while time.monotonic() < deadline:
            for message in tail.read():
                buffer.add(message, mark=tail.mark())
            if tail.caught_up:
                break
        for message in tail.flush():
            buffer.add(message, mark=tail.mark())
    finishing.set()
    sender.join(max(deadline - time.monotonic(), 0.1))
    if sender.is_alive():
        log(f"stopping with {len(buffer)} lines not sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A data channel's copy to a node's disk (issue 24), against the emulated S3 (moto on
127.0.0.1), as a ratio to a plain sequential download of the same objects in the same run.

    python -m bench.data_copy [--runs 3] [--json]

The channel: many small objects (a sharded dataset) and two large ones (multipart). The
baseline reads each object with one GetObject after the other; ours is the agent's step
(userdata/data_channels.copy_channels: 16 objects at once, large ones in 16 MB ranges). Then a
second start, which copies nothing. The emulated S3 (moto, a process of its own) answers at
once; S3 takes tens of milliseconds to a first byte, which is what parallel requests hide: each
run is measured as it is and with LATENCY_S added to every request (a sleep in the client's
before-send hook). The emulated S3 shares this machine's two cores with the copy: on EC2 the
bound is the instance's network and the volume (figures on paper below).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from local.cluster import free_port
from userdata.data_channels import CONNECTIONS, TRANSFER, copy_channels
from userdata.run_inputs import DataChannel

TITLE = "8. Data channel to a node's disk (issue 24): emulated S3, ratio to a sequential download"
SMALL, SMALL_BYTES = 96, 2 * 1024**2
LARGE, LARGE_BYTES = 2, 96 * 1024**2
BUCKET, PREFIX = "bench-data", "dataset/"
MB = 1024**2
# On paper, EC2: gp3's baseline (the root volume: 125 MiB/s unless provisioned), a c7i.2xlarge's
# baseline network (3.125 Gbit/s, bursts to 12.5), and S3's advice of 85-90 MB/s per request.
GP3_MIB_S = 125.0
NETWORK_MIB_S = 3.125e9 / 8 / MB
S3_PER_REQUEST_MIB_S = 85e6 / MB
ON_PAPER_GB = 100
LATENCY_S = 0.03  # a first byte from S3 in the same region, roughly


def client(url: str, latency: float = 0.0) -> Any:
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(max_pool_connections=CONNECTIONS),
    )
    if latency:
        s3.meta.events.register("before-send.s3.*", lambda **_: time.sleep(latency))
    return s3


def fill(s3: Any) -> int:
    s3.create_bucket(Bucket=BUCKET)
    total = 0
    for index in range(SMALL):
        s3.put_object(
            Bucket=BUCKET, Key=f"{PREFIX}shard-{index:04d}.bin", Body=os.urandom(SMALL_BYTES)
        )
        total += SMALL_BYTES
    with tempfile.NamedTemporaryFile() as large:
        large.write(os.urandom(LARGE_BYTES))
        large.flush()
        for index in range(LARGE):
            s3.upload_file(large.name, BUCKET, f"{PREFIX}large-{index}.bin", Config=TRANSFER)
            total += LARGE_BYTES
    return total


def sequential(s3: Any, target: Path) -> float:
    started = time.perf_counter()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        for item in page["Contents"]:
            body = s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
            with (target / item["Key"].replace("/", "_")).open("wb") as out:
                shutil.copyfileobj(body, out, 1024**2)
    return time.perf_counter() - started


def one_run(s3: Any, total: int, label: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        plain = Path(folder) / "plain"
        plain.mkdir()
        baseline = sequential(s3, plain)
        channel = (DataChannel("train", BUCKET, PREFIX),)
        started = time.perf_counter()
        first = copy_channels(s3, channel, Path(folder) / "data", lambda _: None)
        ours = time.perf_counter() - started
        started = time.perf_counter()
        again = copy_channels(s3, channel, Path(folder) / "data", lambda _: None)
        second = time.perf_counter() - started
    if first.copied != total or again.files_copied != 0:
        raise RuntimeError(f"the copy is wrong: {first}, then {again}")
    return {
        f"sequential_mib_s{label}": total / MB / baseline,
        f"ours_mib_s{label}": total / MB / ours,
        f"second_start_s{label}": second,
    }


def measure(runs: int) -> tuple[dict[str, float], int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url)
        total = fill(client(url))
        samples = [
            one_run(client(url), total, "") | one_run(client(url, LATENCY_S), total, "_latency")
            for _ in range(runs)
        ]
    finally:
        server.terminate()
        server.wait()
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}, total


def wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def rows(figures: dict[str, float], total: int) -> list[tuple[str, str]]:
    # EC2: one request at a time is bound by S3's per-request rate; ours by the volume.
    paper_sequential = min(S3_PER_REQUEST_MIB_S, GP3_MIB_S, NETWORK_MIB_S)
    paper_ours = min(GP3_MIB_S, NETWORK_MIB_S)
    gib = ON_PAPER_GB * 1e9 / MB
    found = [
        (
            "channel",
            f"{SMALL} x {SMALL_BYTES // MB} MiB + {LARGE} x {LARGE_BYTES // MB} MiB "
            f"(multipart), {total / MB:.0f} MiB",
        )
    ]
    for label, what in (
        ("", "as moto answers"),
        ("_latency", f"+{LATENCY_S * 1000:.0f} ms a request"),
    ):
        sequential = figures[f"sequential_mib_s{label}"]
        ours = figures[f"ours_mib_s{label}"]
        found += [
            (f"{what}: sequential GetObject (baseline)", f"{sequential:.0f} MiB/s"),
            (f"{what}: ours (16 at once, 16 MB ranges)", f"{ours:.0f} MiB/s"),
            (f"{what}: ours / sequential", f"{ours / sequential:.2f}x"),
            (
                f"{what}: a second start (nothing to copy)",
                f"{figures[f'second_start_s{label}']:.2f} s",
            ),
        ]
    found.append(
        (
            f"on paper, EC2 (gp3 125 MiB/s, 3.1 Gbit/s, S3 ~85 MB/s a request): {ON_PAPER_GB} GB",
            f"sequential {gib / paper_sequential / 60:.0f} min, ours {gib / paper_ours / 60:.0f} "
            f"min (the volume's bound; provision gp3 throughput to go past it)",
        )
    )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_copy", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures, total = measure(args.runs)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"## {TITLE}\n\n| what | figure |\n| --- | --- |")
    for name, value in rows(figures, total):
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

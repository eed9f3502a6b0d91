"""The log shipper: files followed line by line, batches within CloudWatch's limits, a bounded
buffer while CloudWatch cannot be reached; as a process against moto and an IMDSv2 stub, on
127.0.0.1 only."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import EndpointConnectionError

from rehearsal.imds_stub import ImdsStub, node_values
from tests.conftest import REGION, moto_client
from userdata.imds import Imds
from userdata.log_sender import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_BATCH_SPAN_MS,
    Buffer,
    Shipper,
    drop_note,
    next_batch,
)
from userdata.log_shipper import FLUSH_SECONDS, parse_args, stream_and_region
from userdata.log_tail import (
    CUT_MARKER,
    EVENT_OVERHEAD,
    MAX_EVENT_BYTES,
    Event,
    Offsets,
    Tail,
    event_size,
    to_message,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]
BOOT_SCRIPT = PROJECT_DIR / "userdata" / "boot.sh"
HOUR_MS = 3600 * 1000


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_shipper(env: dict[str, str], *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "userdata.log_shipper", *map(str, args)],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_shipper(shipper: subprocess.Popen[str], timeout: float) -> tuple[int, float, str]:
    """SIGTERM: its exit status, how long it took to exit, what it said."""
    started = time.monotonic()
    shipper.send_signal(signal.SIGTERM)
    try:
        _, stderr = shipper.communicate(timeout=timeout)
    finally:
        if shipper.poll() is None:
            shipper.kill()
            shipper.communicate()
    return shipper.returncode, time.monotonic() - started, stderr


def new_group(logs: Any) -> str:
    group = f"/fabric/test-{uuid.uuid4().hex[:8]}"
    logs.create_log_group(logGroupName=group)
    return group


def stream_events(logs: Any, group: str, stream: str) -> list[dict[str, Any]]:
    try:
        answer = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)
    except logs.exceptions.ResourceNotFoundException:
        return []
    return answer["events"]


def messages(logs: Any, group: str, stream: str) -> list[str]:
    return [event["message"] for event in stream_events(logs, group, stream)]


def append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- as a process ----------------------------------------------------------------------------


def test_two_files_arrive_in_order_and_sigterm_flushes_the_rest(
    tmp_path: Path, aws_env: dict[str, str], moto_url: str
) -> None:
    logs = moto_client(moto_url, "logs")
    group = new_group(logs)
    boot, train = tmp_path / "boot.log", tmp_path / "train.log"  # train.log comes later
    boot.write_text("a0\na1\n")
    shipper = start_shipper(
        aws_env,
        *("--log-group", group, "--stream", "node-1", "--region", REGION),
        *("--file", boot, "--file", train, "--interval", "0.2"),
    )
    try:
        wait_until(lambda: messages(logs, group, "node-1") == ["a0", "a1"], 20, "a0, a1")
        append(train, "b0\n\nb1\n")
        append(boot, "a2\n")
        wait_until(lambda: len(messages(logs, group, "node-1")) == 6, 10, "b0, b1, a2")
        # Just before the stop: lines, and a last one with no newline.
        append(train, "b2\nb3 unfinished")
        append(boot, "a3\n")
    finally:
        status, took, stderr = stop_shipper(shipper, timeout=15)
    assert status == 0, stderr
    assert took < 10
    events = stream_events(logs, group, "node-1")
    got = [event["message"] for event in events]
    assert [m for m in got if m.startswith("a")] == ["a0", "a1", "a2", "a3"]
    assert [m for m in got if m.startswith("b") or m == " "] == [
        *("b0", " ", "b1", "b2", "b3 unfinished")  # a blank line is a space: never empty
    ]
    assert len(got) == 9
    stamps = [event["timestamp"] for event in events]
    assert stamps == sorted(stamps)


def test_the_stream_is_named_by_the_rank_and_the_region_comes_from_imds(
    tmp_path: Path, aws_env: dict[str, str], moto_url: str
) -> None:
    region = "eu-west-1"  # not the environment's us-east-1: the region is IMDS's
    logs = boto3.client(
        "logs",
        region_name=region,
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    group = new_group(logs)
    train = tmp_path / "train.log"
    train.write_text("hello from rank 2\n")
    with ImdsStub(node_values("i-0abc", "127.0.0.1", 2, 3, region=region)) as imds:
        env = {**aws_env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
        shipper = start_shipper(
            env, "--log-group", group, "--stack", "Cluster", "--file", train, "--interval", "0.2"
        )
        try:
            wait_until(lambda: messages(logs, group, "Cluster/node-2") != [], 20, "node-2")
        finally:
            status, _, stderr = stop_shipper(shipper, timeout=15)
    assert status == 0, stderr
    assert messages(logs, group, "Cluster/node-2") == ["hello from rank 2"]
    streams = logs.describe_log_streams(logGroupName=group)["logStreams"]
    # The storage stack's group is shared by its clusters: the stream names the cluster.
    assert [stream["logStreamName"] for stream in streams] == ["Cluster/node-2"]


WRITER = """
import sys, time
started = time.monotonic()
with open(sys.argv[1], "a", buffering=1) as file:  # line-buffered: each line written at once
    for i in range(int(sys.argv[2])):
        file.write(f"step {i:07d} " + "x" * 80 + "\\n")
print(time.monotonic() - started)
"""


def read_position(pid: int, path: Path) -> int | None:
    """Where process `pid` is in its open file `path` (None: not open)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
                return int(info.split("pos:")[1].split()[0])
        except (OSError, IndexError):
            continue
    return None


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_unreachable_cloudwatch_never_slows_the_writer_and_memory_stays_bounded(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    env = {**aws_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    train = tmp_path / "train.log"
    train.write_text("")
    lines = 300_000  # 28 MB: far more than 100 lines, several times the shipper's own memory
    shipper = start_shipper(
        env,
        *("--log-group", "/fabric/test", "--stream", "node-1", "--region", REGION),
        *("--file", train, "--interval", "0.2", "--max-buffer", "100"),
    )
    try:
        wait_until(lambda: read_position(shipper.pid, train) == 0, 20, "the file opened")
        time.sleep(0.5)  # a failed send or two
        before = resident_kib(shipper.pid)
        writer = subprocess.run(
            [sys.executable, "-c", WRITER, str(train), str(lines)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert float(writer.stdout) < 10  # about 1 s alone on this machine
        size = train.stat().st_size
        wait_until(lambda: read_position(shipper.pid, train) == size, 20, "the file read")
        grown_kib = resident_kib(shipper.pid) - before
        assert shipper.poll() is None
    finally:
        status, took, stderr = stop_shipper(shipper, timeout=15)
    assert grown_kib < 20_000, f"the shipper grew by {grown_kib} KiB"
    assert status == 0, stderr
    assert took < 10  # a flush of at most 5 s, then it gives up
    assert stderr.count("cannot send to CloudWatch") == 1, stderr  # one line for the streak
    assert "lines not sent" in stderr


# --- its systemd unit, and a shipper started again ----------------------------------------------


def shipper_unit(fabric_home: Path, log_group: str) -> dict[str, list[str]]:
    """The unit that boot.sh's own start_log_shipper writes (run by bash, systemctl stubbed,
    the unit written under fabric_home): `Section.Key` -> its values, in order."""
    script = BOOT_SCRIPT.read_text()
    found = re.search(r"^start_log_shipper\(\) \{\n.*?^\}$", script, re.MULTILINE | re.DOTALL)
    assert found, "boot.sh has no start_log_shipper function"
    units = fabric_home / "units"
    units.mkdir()
    function = found.group(0).replace("/etc/systemd/system/", f"{units}/")
    assert function != found.group(0), "the unit is no longer written to /etc/systemd/system"
    harness = [
        "set -euo pipefail",
        f"FABRIC_HOME={shlex.quote(str(fabric_home))}",
        f"PAYLOAD_DIR={shlex.quote(str(PROJECT_DIR))}",  # has userdata/log_shipper.py: this one
        "VENV=/opt/fabric/venv",
        f"LOG_GROUP={shlex.quote(log_group)}",
        "STACK_NAME=FabricTest",
        f"REGION={REGION}",
        "REHEARSAL=",
        "LOG_SHIPPER_PID=$FABRIC_HOME/log-shipper.pid",
        'log() { echo "log: $*"; }',
        'systemctl() { echo "systemctl $*"; }',
        function,
        "start_log_shipper",
    ]
    result = subprocess.run(
        ["bash", "-c", "\n".join(harness)], capture_output=True, text=True, timeout=30, check=True
    )
    assert "systemctl enable --now fabric-logs.service" in result.stdout, result.stdout
    settings: dict[str, list[str]] = {}
    section = ""
    for line in (units / "fabric-logs.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def unit_list(unit: dict[str, list[str]], key: str) -> list[str]:
    """A list setting (After=, Before=...): every value of every line of it."""
    return " ".join(unit.get(key, [])).split()


def test_the_unit_starts_before_the_agent_so_that_it_stops_after_it(tmp_path: Path) -> None:
    unit = shipper_unit(tmp_path, "/fabric/test")
    # systemd stops units in the reverse of their start order: at power-off the agent has
    # written its last lines before the shipper is told to stop.
    assert "fabric-agent.service" in unit_list(unit, "Unit.Before")
    assert "fabric-agent.service" not in unit_list(unit, "Unit.After")
    assert "network-online.target" in unit_list(unit, "Unit.After")  # stops before the network
    # The flush at SIGTERM (at most FLUSH_SECONDS) ends well before systemd's SIGKILL.
    (timeout,) = unit["Service.TimeoutStopSec"]
    seconds = re.fullmatch(r"(\d+)s?", timeout)
    assert seconds and int(seconds.group(1)) >= FLUSH_SECONDS + 5, timeout
    (exec_start,) = unit["Service.ExecStart"]
    command = shlex.split(exec_start)
    assert command[:3] == ["/opt/fabric/venv/bin/python", "-m", "userdata.log_shipper"]
    args = parse_args(command[3:])
    assert args.file == [str(tmp_path / "boot.log"), str(tmp_path / "agent.log")]
    assert args.state_file == tmp_path / "log-shipper.state"


def test_the_agents_last_lines_written_just_before_sigterm_arrive(
    tmp_path: Path, aws_env: dict[str, str], moto_url: str
) -> None:
    """The unit's own command, stopped as systemd stops it at power-off: after the agent."""
    logs = moto_client(moto_url, "logs")
    group = new_group(logs)
    unit = shipper_unit(tmp_path, group)
    command = [sys.executable, *shlex.split(unit["Service.ExecStart"][0])[1:]]
    boot, agent = tmp_path / "boot.log", tmp_path / "agent.log"
    boot.write_text("boot: phase agent\n")
    last_lines = ["agent: training failed (exit status 1)", "agent: uploaded the run to S3"]
    with ImdsStub(node_values("i-0abc", "127.0.0.1", 1, 2)) as imds:
        env = {**aws_env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
        shipper = subprocess.Popen(
            command,
            cwd=unit["Service.WorkingDirectory"][0],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: messages(logs, group, "FabricTest/node-1") != [], 20, "the boot log")
            append(agent, "".join(f"{line}\n" for line in last_lines))
            append(agent, "agent: stop_when_done: powering off")  # its newline never came
        finally:
            status, took, stderr = stop_shipper(shipper, timeout=30)
    assert status == 0, stderr
    assert took < int(unit["Service.TimeoutStopSec"][0].removesuffix("s"))
    assert messages(logs, group, "FabricTest/node-1") == [
        *("boot: phase agent", *last_lines, "agent: stop_when_done: powering off")
    ]
    saved = Offsets(tmp_path / "log-shipper.state").load()
    assert saved[str(agent)].offset == agent.stat().st_size


def test_a_shipper_started_again_sends_only_the_new_lines(
    tmp_path: Path, aws_env: dict[str, str], moto_url: str
) -> None:
    """A stop/start of the instance: same disk, the unit comes back, user data does not run."""
    logs = moto_client(moto_url, "logs")
    group = new_group(logs)
    boot, agent, state = tmp_path / "boot.log", tmp_path / "agent.log", tmp_path / "state"

    def run_until(expected: list[str]) -> None:
        shipper = start_shipper(
            aws_env,
            *("--log-group", group, "--stream", "node-0", "--region", REGION),
            *("--file", boot, "--file", agent, "--interval", "0.2", "--state-file", state),
        )

        def arrived() -> bool:
            assert shipper.poll() is None, shipper.communicate()[1]
            return messages(logs, group, "node-0") == expected

        try:
            wait_until(arrived, 20, f"{expected}")
        finally:
            status, _, stderr = stop_shipper(shipper, timeout=15)
        assert status == 0, stderr
        assert messages(logs, group, "node-0") == expected  # nothing more came at the stop

    boot.write_text("b0\nb1\n")
    agent.write_text("a0\n")
    run_until(["b0", "b1", "a0"])
    append(boot, "b2\n")
    append(agent, "a1\na2\n")
    run_until(["b0", "b1", "a0", "b2", "a1", "a2"])
    assert Offsets(state).load()[str(agent)].offset == len("a0\na1\na2\n")
    # While it was stopped, boot.log truncated and agent.log written again in place, longer
    # (the same inode): both start over.
    inode = agent.stat().st_ino
    boot.write_text("B0\n")
    agent.write_text("A0 written again, longer than before\n")
    assert agent.stat().st_ino == inode
    run_until(["b0", "b1", "a0", "b2", "a1", "a2", "B0", "A0 written again, longer than before"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["agent.log", "boot.log", "state"]


# --- the buffer and the shipper ----------------------------------------------------------------


class FlakyLogs:
    """A CloudWatch Logs client that cannot be reached for its first `failures` calls;
    `during_call` runs inside each call (the reading thread adding lines meanwhile)."""

    def __init__(self, failures: int, during_call: Callable[[], None] = lambda: None) -> None:
        self.failures = failures
        self.during_call = during_call
        self.calls = 0
        self.sent: list[Event] = []

    def put_log_events(self, **call: Any) -> dict[str, Any]:
        self.calls += 1
        self.during_call()
        if self.failures:
            self.failures -= 1
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        self.sent += [Event(e["timestamp"], e["message"]) for e in call["logEvents"]]
        return {}


def add_lines(buffer: Buffer, numbers: range) -> None:
    for number in numbers:
        buffer.add(f"line {number}", timestamp=1_000_000 + number)


def test_a_full_buffer_drops_the_oldest_and_one_note_takes_their_place() -> None:
    buffer = Buffer(limit=100)
    add_lines(buffer, range(250))
    logs = FlakyLogs(failures=3)
    said: list[str] = []
    shipper = Shipper(logs, "group", "node-0", buffer, interval=5.0, log=said.append)
    assert [shipper.send_batch() for _ in range(4)] == [False, False, False, True]
    assert [e.message for e in logs.sent] == [
        drop_note(150),
        *(f"line {n}" for n in range(150, 250)),
    ]
    assert drop_note(150) == "[log-shipper] dropped 150 lines while CloudWatch was unreachable"
    assert logs.sent[0].timestamp == logs.sent[1].timestamp  # in time order
    assert buffer.empty()
    assert len([line for line in said if "cannot send" in line]) == 1


def test_lines_read_during_a_failed_send_push_out_the_oldest_of_that_send() -> None:
    buffer = Buffer(limit=100)
    add_lines(buffer, range(100))
    added = iter([range(100, 130), range(130, 160), range(0)])
    logs = FlakyLogs(failures=2, during_call=lambda: add_lines(buffer, next(added)))
    shipper = Shipper(logs, "group", "node-0", buffer, log=lambda _: None)
    assert [shipper.send_batch() for _ in range(3)] == [False, False, True]
    assert [e.message for e in logs.sent] == [
        drop_note(60),
        *(f"line {n}" for n in range(60, 160)),
    ]


def test_lines_read_during_a_good_send_lose_nothing() -> None:
    buffer = Buffer(limit=100)
    add_lines(buffer, range(100))
    added = iter([range(100, 130), range(0)])
    logs = FlakyLogs(failures=0, during_call=lambda: add_lines(buffer, next(added)))
    shipper = Shipper(logs, "group", "node-0", buffer, log=lambda _: None)
    assert shipper.send_batch() and shipper.send_batch()
    assert [e.message for e in logs.sent] == [f"line {n}" for n in range(130)]
    assert buffer.empty()


def test_backoff_doubles_up_to_a_minute() -> None:
    shipper = Shipper(FlakyLogs(0), "group", "node-0", Buffer(10), interval=5.0)
    waits = []
    for failures in range(6):
        shipper.failures = failures
        waits.append(shipper.backoff())
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_missing_group_keeps_the_lines_until_it_exists(moto_url: str) -> None:
    logs = moto_client(moto_url, "logs")
    group = f"/fabric/test-{uuid.uuid4().hex[:8]}"
    buffer = Buffer(limit=100)
    for number in range(3):
        buffer.add(f"line {number}")  # now: CloudWatch refuses events weeks old
    said: list[str] = []
    shipper = Shipper(logs, group, "node-0", buffer, interval=1.0, log=said.append)
    assert not shipper.send_batch()
    assert f"log group {group} does not exist" in said[0]
    assert len(buffer) == 3
    logs.create_log_group(logGroupName=group)
    assert shipper.send_batch()  # the stream is made on the way
    assert messages(logs, group, "node-0") == ["line 0", "line 1", "line 2"]
    shipper.buffer = Buffer(limit=100)  # a clock gone wrong: rejected, said once, not retried
    add_lines(shipper.buffer, range(2))
    assert shipper.send_batch() and shipper.buffer.empty()
    assert [line for line in said if "rejected" in line] == [said[-1]]


def test_the_instance_id_names_the_stream_of_a_node_without_rank() -> None:
    with ImdsStub(node_values("i-0abc", "127.0.0.1", None, 3)) as imds:
        assert stream_and_region(None, None, Imds(imds.url), wait=0.3) == ("i-0abc", REGION)
        assert stream_and_region("mine", None, Imds(imds.url), wait=0) == ("mine", REGION)
    unreachable = Imds(f"http://127.0.0.1:{closed_port()}", timeout=0.5)
    assert stream_and_region(None, None, unreachable, wait=0) == (socket.gethostname(), None)


def test_offsets_are_saved_only_once_cloudwatch_has_the_lines(tmp_path: Path) -> None:
    path, state = tmp_path / "agent.log", tmp_path / "log-shipper.state"
    offsets = Offsets(state)
    saved_during_calls: list[int | None] = []

    def saved_offset() -> int | None:
        mark = Offsets(state).load().get(str(path))
        return None if mark is None else mark.offset

    logs = FlakyLogs(failures=1, during_call=lambda: saved_during_calls.append(saved_offset()))
    buffer = Buffer(limit=100)
    shipper = Shipper(logs, "group", "node-0", buffer, log=lambda _: None, on_sent=offsets.commit)
    tail = Tail(path)
    path.write_text("one\ntwo\n")
    for message in tail.read():
        buffer.add(message, mark=tail.mark())
    assert not shipper.send_batch()
    assert not state.exists()  # not sent: nothing saved
    assert shipper.send_batch()
    assert saved_offset() == 8
    append(path, "three\n")
    for message in tail.read():
        buffer.add(message, mark=tail.mark())
    assert shipper.send_batch()
    assert saved_offset() == 14
    assert saved_during_calls == [None, None, 8]  # while CloudWatch had not said yes yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.log", "log-shipper.state"]

    said: list[str] = []
    saved = state.read_text()
    for broken in ("{not json", "[]", saved.replace('"offset": 14', '"offset": "14"')):
        assert broken != saved
        state.write_text(broken)
        assert Offsets(state, log=said.append).load() == {}  # from the start: nothing lost
    assert len(said) == 3 and all(str(state) in line for line in said)


# --- batches and messages ----------------------------------------------------------------------


def assert_within_limits(batches: list[list[Event]], events: list[Event]) -> None:
    assert [event for batch in batches for event in batch] == events  # nothing lost, in order
    for batch in batches:
        assert 1 <= len(batch) <= MAX_BATCH_EVENTS
        assert sum(event_size(event) for event in batch) <= MAX_BATCH_BYTES
        assert batch[-1].timestamp - batch[0].timestamp < MAX_BATCH_SPAN_MS
        assert all(event_size(event) <= MAX_EVENT_BYTES for event in batch)


def split(events: list[Event]) -> list[list[Event]]:
    batches = []
    while events[sum(map(len, batches)) :]:
        batches.append(next_batch(events[sum(map(len, batches)) :]))
    return batches


def test_batches_never_exceed_the_limits() -> None:
    many = [Event(1000 + i, f"line {i}") for i in range(25_000)]
    batches = split(many)
    assert [len(batch) for batch in batches] == [10_000, 10_000, 5_000]
    assert_within_limits(batches, many)

    largest = to_message(b"x" * 300_000)  # cut to one whole event: four fill a batch exactly
    assert event_size(Event(0, largest)) == MAX_EVENT_BYTES
    large = [Event(1000, largest)] * 10
    batches = split(large)
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert_within_limits(batches, large)

    rng = random.Random(7)
    mixed = [
        Event(1000 + i, to_message("é".encode() * rng.randint(0, 140_000))) for i in range(300)
    ]
    assert_within_limits(split(mixed), mixed)

    spread = [Event(t, "x") for t in (0, HOUR_MS, 24 * HOUR_MS - 1, 24 * HOUR_MS, 50 * HOUR_MS)]
    batches = split(spread)
    assert [len(batch) for batch in batches] == [3, 1, 1]
    assert_within_limits(batches, spread)


def test_long_lines_are_cut_with_a_marker_to_fit_one_event() -> None:
    for line in (b"x" * 300_000, "é".encode() * 200_000, b"\xff" * 100_000):
        message = to_message(line)
        assert message.endswith(CUT_MARKER)
        assert len(message.encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES
    assert to_message(b"short \xff line") == "short \ufffd line"
    assert to_message(b"") == " "


# --- following files ---------------------------------------------------------------------------


def test_a_tail_waits_for_its_file_and_its_newlines_and_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    tail = Tail(path)
    assert list(tail.read()) == []  # not there yet
    path.write_bytes(b"one\r\ntw")
    assert list(tail.read()) == ["one"]
    append(path, "o\nthree")
    assert list(tail.read()) == ["two"]
    path.write_text("new\n")  # truncated and written again: its unfinished line, then over
    assert list(tail.read()) == ["three", "new"]
    rotated = tmp_path / "out.log.new"
    append(path, "last of the old\n")
    rotated.write_text("first of the new\n")
    os.replace(rotated, path)
    assert list(tail.read()) == ["last of the old", "first of the new"]
    append(path, "unfinished")
    assert list(tail.read()) == []
    assert list(tail.flush()) == ["unfinished"]


def test_a_line_that_never_ends_is_sent_cut_once(tmp_path: Path) -> None:
    path = tmp_path / "progress.log"
    tail = Tail(path)
    path.write_bytes(b"\r".join(b"progress %07d" % i for i in range(40_000)))  # tqdm's way
    cut = list(tail.read())
    assert len(cut) == 1 and cut[0].endswith(CUT_MARKER)
    append(path, " done\nnext\n")
    assert list(tail.read()) == ["next"]
    assert list(tail.flush()) == []


def test_a_tail_goes_on_from_a_mark_of_the_same_file_only(tmp_path: Path) -> None:
    path = tmp_path / "agent.log"
    path.write_text("one\ntwo\nthr")
    tail = Tail(path)
    assert list(tail.read()) == ["one", "two"]
    mark = tail.mark()
    assert (mark.offset, mark.cut) == (8, False)
    append(path, "ee\n")
    assert list(Tail(path, mark).read()) == ["three"]
    # Sent cut: the rest of that line is skipped after a restart too.
    path.write_bytes(b"x" * (MAX_EVENT_BYTES + 1))
    tail = Tail(path)
    assert len(list(tail.read())) == 1
    append(path, "x end of the long line\nnext\n")
    assert list(Tail(path, tail.mark()).read()) == ["next"]
    # The same name but not the same file: from its start.
    path.write_text("one\ntwo\nthree\n")
    tail = Tail(path)
    assert len(list(tail.read())) == 3
    mark = tail.mark()
    path.write_text("ONE\nTWO\nTHREE\nFOUR\n")  # in place: same inode, longer
    assert list(Tail(path, mark).read()) == ["ONE", "TWO", "THREE", "FOUR"]
    path.write_text("one\n")  # truncated
    assert list(Tail(path, mark).read()) == ["one"]
    copy = tmp_path / "copy.log"
    copy.write_text("one\ntwo\nthree\nfour\n")
    os.replace(copy, path)  # replaced: another inode, even with the same first lines
    assert list(Tail(path, mark).read()) == ["one", "two", "three", "four"]

"""The node agent against real HTTP servers: moto (SSM, S3) and an IMDSv2 stub, on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from local.cluster import free_port
from rehearsal.imds_stub import ImdsStub, node_values
from stacks.config import (
    PROJECT_DIR,
    main_address_parameter,
    members_parameter,
    phase_parameter_template,
    stop_parameter,
)
from userdata.cluster_control import NO_STOP, Stop
from userdata.fabric_command import LAUNCH_SCRIPT, fabric_environment, fabric_run_command
from userdata.phase import decode_phase

MAIN_IP = "127.0.0.2"  # routed through lo, like a peer's address through eth0 on EC2
INITIAL_PHASE = "booting"  # what the stack writes in every phase parameter (cluster_parameters.py)
NO_PHASE = "no phase recorded: this node's phase parameter is named by its rank"


def parameter_name() -> str:
    return main_address_parameter(f"Test{uuid.uuid4().hex[:8]}")


@dataclass
class StackParameters:
    """A fresh stack's SSM parameters, named as the template names them."""

    stack: str

    @classmethod
    def put(cls, ssm: Any, main_address: str | None, num_nodes: int = 0) -> StackParameters:
        """The main address (None: not published yet) and, as the stack makes them, the
        phase parameters of `num_nodes` nodes, the members (instances i-<rank>, at least i-0)
        and the stop."""
        parameters = cls(f"Test{uuid.uuid4().hex[:8]}")
        if main_address is not None:
            ssm.put_parameter(Name=parameters.main_address, Value=main_address, Type="String")
        for rank in range(num_nodes):
            ssm.put_parameter(Name=parameters.phase(rank), Value=INITIAL_PHASE, Type="String")
        members = ",".join(f"i-{rank}" for rank in range(max(num_nodes, 1)))
        ssm.put_parameter(Name=parameters.members, Value=members, Type="String")
        ssm.put_parameter(Name=parameters.stop, Value=NO_STOP, Type="String")
        return parameters

    @property
    def members(self) -> str:
        return members_parameter(self.stack)

    @property
    def stop(self) -> str:
        return stop_parameter(self.stack)

    def stop_value(self, ssm: Any) -> Stop | None:
        return Stop.decode(ssm.get_parameter(Name=self.stop)["Parameter"]["Value"])

    def phase_of(self, ssm: Any, rank: int) -> str:
        return decode_phase(ssm.get_parameter(Name=self.phase(rank))["Parameter"]["Value"]).text

    @property
    def main_address(self) -> str:
        return main_address_parameter(self.stack)

    def phase(self, rank: int) -> str:
        return phase_parameter_template(self.stack).format(rank=rank)

    def phases(self, ssm: Any) -> dict[str, tuple[str, int]]:
        """Every phase parameter of the stack: name -> (value, version); a version above 1
        means someone wrote it after the stack did."""
        found = ssm.get_parameters_by_path(Path=f"/fabric/{self.stack}/", Recursive=True)
        return {
            p["Name"]: (decode_phase(p["Value"]).text, p["Version"])
            for p in found["Parameters"]
            if p["Name"].endswith("/phase")
        }

    @property
    def agent_options(self) -> list[str]:
        return [
            "--main-address-parameter",
            self.main_address,
            "--phase-parameter",
            phase_parameter_template(self.stack),
            "--members-parameter",
            self.members,
            "--stop-parameter",
            self.stop,
        ]


def main_port() -> str:
    """A free port for a test's rendezvous: tests run side by side (pytest-xdist) on one loopback,
    as two clusters in one VPC would not."""
    return str(free_port())


def run_agent(
    env: dict[str, str],
    imds: ImdsStub,
    *args: str,
    timeout: float = 60,
    cpus: set[int] | None = None,
) -> subprocess.CompletedProcess[str]:
    """cpus: the CPUs the agent may run on (its affinity), so that its thread count is known."""
    env = {**env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
    return subprocess.run(
        [sys.executable, "-m", "userdata.agent", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )


class BackgroundAgent:
    """An agent started in the background, its output (stdout and stderr) read line by line as
    it comes: a test waits for what the agent says it is doing, never for a guessed time."""

    def __init__(self, env: dict[str, str], imds: ImdsStub, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "userdata.agent", *args],
            cwd=PROJECT_DIR,
            env={**env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: fabric run and its workers end with it
        )
        self.lines: list[str] = []
        self._ended = False
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # text mode: tqdm's \r also ends a line
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._ended = True
            self._seen.notify_all()

    @property
    def output(self) -> str:
        with self._seen:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line holding `text`, as soon as the agent has printed it."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = "ended" if self._ended else f"is still running after {timeout:g} s"
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"the agent {why} without saying {text!r}:\n{tail}")
                self._seen.wait(left)

    def finish(self, timeout: float) -> int:
        """The exit status, once the agent has ended and all its output is read."""
        self.process.wait(timeout=timeout)
        self._reader.join()
        return self.process.returncode

    def __enter__(self) -> BackgroundAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:  # a failed test: end the agent and what it started
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(timeout=10)


STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00")


def time_of(line: str, text: str) -> datetime:
    """The UTC time stamped just before `text` on a line (the agent's log lines and the
    payload's "first step done" carry one; a tqdm bar may come first on the same line)."""
    return datetime.fromisoformat(STAMP.findall(line[: line.index(text)])[-1])


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(("rank", "num_nodes"), [(0, 2), (1, 2), (0, 4), (1, 4), (3, 4)])
def test_dry_run_prints_the_fabric_command(aws_env, ssm, rank: int, num_nodes: int) -> None:
    name = parameter_name()
    ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String")
    own_ip = MAIN_IP if rank == 0 else f"127.0.0.{10 + rank}"
    with ImdsStub(node_values(f"i-{rank:017x}", own_ip, rank, num_nodes)) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--main-address-parameter",
            name,
            "--devices-per-node",
            "2",
            "--main-port",
            "29555",
            "trainer/train.py",
            "--",
            "--epochs",
            "3",
            "--run-name",
            "a b",
        )
    assert result.returncode == 0, result.stderr
    command, environment = dry_run_environment(result.stdout)
    assert command == [
        "fabric",
        "run",
        f"--node-rank={rank}",
        f"--main-address={MAIN_IP}",
        "--main-port=29555",
        "--accelerator=cpu",
        "--devices=2",
        f"--num-nodes={num_nodes}",
        "--precision=32-true",
        str(LAUNCH_SCRIPT),
        "--",
        "trainer/train.py",
        "--epochs",
        "3",
        "--run-name",
        "a b",
    ]
    assert environment["GLOO_SOCKET_IFNAME"] == "lo"
    assert "NCCL_SOCKET_IFNAME" not in environment
    # The test's CPUs (its affinity, which the agent inherits) shared by the 2 devices.
    assert environment["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert environment["PET_RDZV_CONF"] == "timeout=600"
    assert not {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA"} & environment.keys()  # no --efa
    assert "would stop now" not in result.stdout  # no --stop-when-done given


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin the agent to")
@pytest.mark.parametrize(("cpus", "devices", "threads"), [(1, 1, 1), (2, 1, 2), (2, 2, 1)])
def test_threads_per_process_are_the_cores_the_agent_may_use_by_devices(
    aws_env, ssm, cpus: int, devices: int, threads: int
) -> None:
    """Pinned to `cpus` CPUs (as a container or cgroup would), not the machine's count."""
    name = parameter_name()
    ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String")
    pinned = set(sorted(os.sched_getaffinity(0))[:cpus])
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--main-address-parameter",
            name,
            "--devices-per-node",
            str(devices),
            "train.py",
            cpus=pinned,
        )
    assert result.returncode == 0, result.stderr
    assert dry_run_environment(result.stdout)[1]["OMP_NUM_THREADS"] == str(threads)


def fake_nvidia_smi(folder: Path, gpus: int) -> str:
    """A PATH whose nvidia-smi lists `gpus` GPUs, as on a GPU node."""
    tool = folder / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA A10G (UUID: GPU-{i})'\n" for i in range(gpus))
    tool.write_text(f"#!/bin/sh\n{lines}")
    tool.chmod(0o755)
    return f"{folder}:/usr/sbin:/usr/bin:/bin"


def test_gpu_sets_nccl_interface_too(aws_env, ssm, tmp_path: Path) -> None:
    name = parameter_name()
    ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String")
    aws_env = {**aws_env, "PATH": fake_nvidia_smi(tmp_path, 1)}
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--accelerator",
            "gpu",
            "--main-address-parameter",
            name,
            "train.py",
        )
    assert result.returncode == 0, result.stderr
    assert "NCCL_SOCKET_IFNAME==lo" in result.stdout.splitlines()
    assert "--accelerator=gpu" in result.stdout


def dry_run_environment(stdout: str) -> tuple[list[str], dict[str, str]]:
    """The fabric run command and the environment lines that follow it."""
    lines = stdout.splitlines()
    command = next(line for line in lines if line.startswith("fabric run "))
    environment = dict(line.split("=", 1) for line in lines[lines.index(command) + 1 :])
    return shlex.split(command), environment


def test_gpu_with_efa_and_bf16(aws_env, ssm, tmp_path: Path) -> None:
    name = parameter_name()
    ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String")
    aws_env = {**aws_env, "PATH": fake_nvidia_smi(tmp_path, 8), "LD_LIBRARY_PATH": "/usr/x/lib"}
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--accelerator",
            "gpu",
            "--devices-per-node",
            "8",
            "--precision",
            "bf16-mixed",
            "--efa",
            "--efa-rdma",
            "--main-address-parameter",
            name,
            "train.py",
        )
    assert result.returncode == 0, result.stderr
    command, environment = dry_run_environment(result.stdout)
    assert command[-5:] == [
        "--num-nodes=2",
        "--precision=bf16-mixed",
        str(LAUNCH_SCRIPT),
        "--",
        "train.py",
    ]
    # The AMI's EFA libraries first, what the service inherited kept behind them.
    efa_libraries = "/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"
    assert environment["LD_LIBRARY_PATH"] == f"{efa_libraries}:/usr/x/lib"
    assert environment["FI_PROVIDER"] == "efa"
    assert environment["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert environment["NCCL_SOCKET_IFNAME"] == "=lo"


def command_for(**options: Any) -> list[str]:
    return fabric_run_command(
        node_rank=1,
        main_address="10.0.0.5",
        main_port=29400,
        accelerator="gpu",
        devices=4,
        num_nodes=2,
        script="train.py",
        script_args=["--epochs", "3"],
        **options,
    )


def test_precision_comes_before_the_script_and_only_when_given() -> None:
    assert not any(part.startswith("--precision") for part in command_for())
    command = command_for(precision="16-mixed")
    assert command[-7:] == [
        "--num-nodes=2",
        "--precision=16-mixed",
        str(LAUNCH_SCRIPT),
        "--",
        "train.py",
        "--epochs",
        "3",
    ]
    launched = command_for(launcher=["python", "-m", "lightning.fabric.cli"])
    assert launched[:4] == ["python", "-m", "lightning.fabric.cli", "--node-rank=1"]


def efa_environment(
    monkeypatch: pytest.MonkeyPatch, efa: bool, inherited: str | None, rdma: bool = True
) -> dict[str, str]:
    if inherited is None:
        monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH", inherited)
    return fabric_environment(
        interface="ens5",
        accelerator="gpu",
        threads=4,
        rendezvous_timeout=600,
        efa=efa,
        efa_rdma=efa and rdma,
    )


@pytest.mark.parametrize(
    ("instance_type", "rdma"),
    [
        ("p4d.24xlarge", True),
        ("p5.48xlarge", True),
        ("p5en.48xlarge", True),
        ("g5.48xlarge", False),  # EFA without RDMA: FI_EFA_USE_DEVICE_RDMA=1 would abort
        ("g6e.12xlarge", False),
        ("g4dn.metal", False),
    ],
)
def test_device_rdma_only_where_the_efa_device_has_it(
    monkeypatch: pytest.MonkeyPatch, instance_type: str, rdma: bool
) -> None:
    from stacks.instance_types import EFA_TYPES, efa_has_rdma

    assert instance_type in EFA_TYPES
    assert efa_has_rdma(instance_type) is rdma
    environment = efa_environment(monkeypatch, True, None, rdma=efa_has_rdma(instance_type))
    assert environment["FI_PROVIDER"] == "efa"
    assert ("FI_EFA_USE_DEVICE_RDMA" in environment) is rdma


def test_efa_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    efa_libraries = "/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"
    alone = efa_environment(monkeypatch, True, None)
    assert alone["LD_LIBRARY_PATH"] == efa_libraries  # no empty entry (the current directory)
    assert (alone["FI_PROVIDER"], alone["FI_EFA_USE_DEVICE_RDMA"]) == ("efa", "1")
    inherited = efa_environment(monkeypatch, True, "/a:/b")
    assert inherited["LD_LIBRARY_PATH"] == f"{efa_libraries}:/a:/b"
    assert "FI_EFA_USE_DEVICE_RDMA" not in efa_environment(monkeypatch, True, None, rdma=False)
    without = efa_environment(monkeypatch, False, "/a")
    assert not {"LD_LIBRARY_PATH", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA"} & without.keys()
    assert without["NCCL_SOCKET_IFNAME"] == "=ens5"


def test_an_unknown_precision_is_refused(aws_env) -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--precision",
            "8-true",
            "--main-address-parameter",
            "/x/y",
            "t.py",
        )
    assert result.returncode == 2
    assert "argument --precision: invalid choice: '8-true'" in result.stderr
    assert "'bf16-mixed'" in result.stderr


def test_waits_for_a_parameter_that_appears_later(aws_env, ssm) -> None:
    name = parameter_name()
    with (
        ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds,
        BackgroundAgent(
            aws_env,
            imds,
            "--dry-run",
            "--main-address-parameter",
            name,
            "--main-address-timeout",
            "120",
            "train.py",
        ) as agent,
    ):
        # Published only once the agent says it is waiting: whenever that is, it must wait on.
        agent.wait_for(f"waiting for the main node: {name} not there yet", timeout=60)
        ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String")
        assert agent.finish(timeout=60) == 0, agent.output
    command, _ = dry_run_environment(agent.output)
    assert f"--main-address={MAIN_IP}" in command


def test_parameter_that_never_appears_fails_within_the_bound(aws_env, ssm) -> None:
    parameters = StackParameters.put(ssm, None, num_nodes=2)
    name = parameters.main_address
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        started = time.monotonic()
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--main-address-timeout",
            "4",
            "--stop-when-done",
            "train.py",
        )
        elapsed = time.monotonic() - started
    line = (
        f"parameter {name} did not appear within 4 s: the main node (node 0) never "
        "published its address"
    )
    assert one_error_line(result) == f"error: {line}"
    assert 4 <= elapsed < 15
    assert parameters.phases(ssm)[parameters.phase(1)] == (f"failed: {line}", 3)
    assert "would stop now" in result.stdout  # on EC2 the node stops itself here


def test_imds_refuses_metadata_without_a_token() -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", 0, 1)) as imds:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{imds.url}/latest/meta-data/instance-id", timeout=5)
        assert refused.value.code == 401


def test_imds_without_token_api_is_a_clear_failure(aws_env) -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", 0, 1), mode="no-token-api") as imds:
        result = run_agent(aws_env, imds, "--dry-run", "--main-address-parameter", "/x/y", "t.py")
        assert not any(method == "GET" for method, _, _ in imds.requests)
    assert one_error_line(result).startswith(
        f"error: IMDS at {imds.url} answered HTTP 403 for an IMDSv2 token"
    )


def test_ssm_unreachable_is_a_clear_failure(aws_env) -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        env = {**aws_env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard port: nothing listens
        started = time.monotonic()
        result = run_agent(
            env, imds, "--dry-run", "--main-address-parameter", "/x/y", "--ssm-timeout", "1", "t.py"
        )
    line = one_error_line(result)
    assert line.startswith("error: SSM unreachable: Could not connect to the endpoint URL")
    assert time.monotonic() - started < 30


def test_node0_refuses_a_stale_main_address_and_records_the_phase(aws_env, ssm) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.3", num_nodes=2)
    with ImdsStub(node_values("i-0", MAIN_IP, 0, 2)) as imds:
        result = run_agent(aws_env, imds, *parameters.agent_options, "t.py")
    line = f"parameter {parameters.main_address} says 127.0.0.3, but this node 0 has {MAIN_IP}"
    assert one_error_line(result) == f"error: {line}"
    assert parameters.phases(ssm) == {
        parameters.phase(0): (f"failed: {line}", 3),  # waiting-for-main, then failed
        parameters.phase(1): (INITIAL_PHASE, 1),
    }


SCRIPT = """\
import os, pathlib, sys
run_dir = pathlib.Path(os.environ["FABRIC_RUN_DIR"])
run_dir.mkdir(parents=True, exist_ok=True)
rank = os.environ["RANK"]
(run_dir / f"rank{rank}.txt").write_text(os.environ["GLOO_SOCKET_IFNAME"])
(run_dir / "partial.ckpt.tmp").write_text("half")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("exit_status", [0, 3])
@pytest.mark.slow
def test_real_run_records_phases_and_uploads_artifacts(
    aws_env, ssm, s3, tmp_path: Path, exit_status: int
) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    stack = parameters.stack
    s3.create_bucket(Bucket=stack.lower())
    # What a cluster before this one left of the run: restored first, complete files only.
    s3.put_object(Bucket=stack.lower(), Key=f"{stack}/checkpoints/step-00000007.ckpt", Body=b"7")
    s3.put_object(Bucket=stack.lower(), Key=f"{stack}/checkpoints/step-8.ckpt.tmp", Body=b"x")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--devices-per-node",
            "1",
            "--main-port",
            main_port(),
            "--run-dir",
            str(tmp_path / "run"),
            "--artifacts-uri",
            f"s3://{stack.lower()}/{stack}",
            "--stop-when-done",
            "--rendezvous-timeout",
            "30",
            "--max-restarts",
            "0",
            str(script),
            "--",
            str(exit_status),
            timeout=120,
        )
    recorded = parameters.phase_of(ssm, 0)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.lower()).get("Contents", [])]
    assert (tmp_path / "run" / "checkpoints" / "step-00000007.ckpt").read_bytes() == b"7"
    assert not (tmp_path / "run" / "checkpoints" / "step-8.ckpt.tmp").exists()
    if exit_status == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        assert recorded == "done"
        # The temporary file is never uploaded; the run is marked complete.
        assert sorted(set(keys) - {f"{stack}/checkpoints/step-8.ckpt.tmp"}) == [
            f"{stack}/checkpoints/step-00000007.ckpt",
            f"{stack}/fabric-args.json",
            f"{stack}/fabric-run.json",
            f"{stack}/rank0.txt",
        ]
    else:
        assert result.returncode != 0
        # Before any training step: a script error, with its cause, and not restarted.
        assert recorded == "failed: script: exited with status 3"
        assert f"{stack}/fabric-run.json" not in keys  # a failed run is not complete
    assert "phase: waiting-for-main" in result.stdout
    assert "phase: training (resumed from step 7)" in result.stdout
    assert "would stop now (not powering off: not started by the boot script" in result.stdout


# One optimizer step: the fault comes after training started (a script error would not be
# restarted: test_a_script_error_is_not_restarted_and_the_phase_says_why).
ONE_STEP = """\
import torch
weight = torch.nn.Parameter(torch.zeros(1))
torch.optim.SGD([weight], lr=0.1).step()
"""
FLAKY_SCRIPT = (
    ONE_STEP
    + """\
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("failed once")
    raise RuntimeError("a fault after the first step")
"""
)


@pytest.mark.slow
def test_a_failed_run_is_restarted_and_then_succeeds(aws_env, ssm, tmp_path: Path) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_SCRIPT)
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--devices-per-node",
            "1",
            "--main-port",
            main_port(),
            "--max-restarts",
            "2",
            "--restart-delay",
            "0",
            str(script),
            "--",
            str(tmp_path / "marker"),
            timeout=120,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "fabric run exited with status 1 (RuntimeError: a fault after the first step): "
        "restart 1 of 2" in result.stdout
    )
    assert "phase: training (restart 1)" in result.stdout
    assert parameters.phase_of(ssm, 0) == "done"


LAUNCH_UNDER_FABRIC_RUN = """\
from lightning.fabric import Fabric
Fabric().launch()
"""


@pytest.mark.slow
def test_a_script_error_is_not_restarted_and_the_phase_says_why(aws_env, ssm, tmp_path) -> None:
    """Lightning's own mistake (launch() under fabric run) before any training step: one
    attempt, not four, and the phase names the cause and its fix, not only an exit status."""
    parameters = StackParameters.put(ssm, "127.0.0.1")
    script = tmp_path / "launches.py"
    script.write_text(LAUNCH_UNDER_FABRIC_RUN)
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            *("--devices-per-node", "2", "--main-port", main_port(), "--max-restarts", "3"),
            *("--restart-delay", "0", str(script)),
            timeout=120,
        )
    assert result.returncode != 0
    assert "restart 1 of 3" not in result.stdout
    assert "the script failed before its first training step: no restart" in result.stdout
    phase = parameters.phase_of(ssm, 0)
    cause = "failed: script: RuntimeError: This script was launched through the CLI"
    fix = "(fix: under `fabric run`, leave out fabric.launch() (fabric run has started the "
    assert phase.startswith(cause) and phase.endswith(fix + "processes already))"), phase
    assert parameters.stop_value(ssm).state == "failed"


ABORTS_AT_EXIT = (
    ONE_STEP
    + """\
import atexit, os, pathlib, sys, time
folder = pathlib.Path(sys.argv[1])
(folder / os.environ["RANK"]).write_text("trained")
while len(list(folder.iterdir())) < int(os.environ["WORLD_SIZE"]):  # as a last collective
    time.sleep(0.05)
if os.environ["RANK"] == "0":
    atexit.register(os.abort)  # as a gloo thread torn down at interpreter exit does, now and then
else:
    time.sleep(3)  # its last lines (a final save) while rank 0 is already at its exit
"""
)


@pytest.mark.slow
def test_a_script_that_finished_is_done_whatever_its_exit(aws_env, ssm, tmp_path) -> None:
    """Rank 0 finished its script, then died at interpreter exit (-6) while rank 1 was still in
    its last lines: the launcher keeps rank 0 until rank 1 has finished too, and the run is
    done, never restarted (a restart would train nothing and overwrite the run's summary)."""
    parameters = StackParameters.put(ssm, "127.0.0.1")
    script = tmp_path / "aborts.py"
    script.write_text(ABORTS_AT_EXIT)
    (tmp_path / "trained").mkdir()
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            *("--devices-per-node", "2", "--main-port", main_port(), "--max-restarts", "3"),
            *("--restart-delay", "0", str(script), "--", str(tmp_path / "trained")),
            timeout=120,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "after every rank finished: done" in result.stdout
    assert "restart 1 of 3" not in result.stdout
    assert parameters.phase_of(ssm, 0) == "done"
    assert sorted(path.name for path in (tmp_path / "trained").iterdir()) == ["0", "1"]


# What one fabric run takes besides waiting for the rendezvous: starting Python and importing
# torch and lightning, torchrun's delay between its two tries, its shutdown: 15 to 25 s an
# attempt here, idle or loaded. Far below torchrun's default wait (2 x 900 s), which the bound
# is there to rule out.
FABRIC_RUN_SLACK = 60


@pytest.mark.slow
def test_main_node_that_never_comes_fails_within_the_rendezvous_bound(aws_env, ssm) -> None:
    """With a restart, as deployed (max_restarts defaults to 3): every attempt waits for the
    rendezvous (torchrun's store client tries twice, each up to the timeout), and the whole is
    bounded by attempts x (2 x rendezvous timeout + slack) + restart delays."""
    rendezvous, restarts, delay = 5, 1, 2
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=2)  # nothing listens there
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        started = time.monotonic()
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--devices-per-node",
            "1",
            "--main-port",
            main_port(),
            "--rendezvous-timeout",
            str(rendezvous),
            "--max-restarts",
            str(restarts),
            "--restart-delay",
            str(delay),
            "--stop-when-done",
            "trainer/train.py",
            timeout=300,
        )
        elapsed = time.monotonic() - started
    # fabric run's own output (torchrun's traceback) is streamed; the agent's verdict is one line.
    verdict = f"fabric run exited with status 1 after {restarts} restart(s)"
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == f"error: {verdict}"
    assert f"fabric run exited with status 1: restart 1 of {restarts} in {delay} s" in result.stdout
    assert "phase: training (restart 1)" in result.stdout
    # Each attempt waited the whole rendezvous timeout for node 0, and no longer.
    timeouts = re.findall(r"The client socket has timed out after (\d+)ms", result.stderr)
    assert set(timeouts) == {str(rendezvous * 1000)}
    attempts = restarts + 1
    assert attempts * rendezvous + restarts * delay <= elapsed
    assert elapsed < attempts * (2 * rendezvous + FABRIC_RUN_SLACK) + restarts * delay
    assert parameters.phases(ssm)[parameters.phase(1)][0] == f"failed: {verdict}"
    assert "would stop now" in result.stdout  # on EC2 the node stops itself here


@pytest.mark.slow
def test_a_late_main_node_is_waited_for(aws_env, ssm, tmp_path: Path) -> None:
    """Node 1 first: it waits for the main address, then in the rendezvous for node 0, which
    starts only after node 1 is running fabric run; one run of 2 nodes, no restart."""
    parameters = StackParameters.put(ssm, None, num_nodes=2)
    payload = ["trainer/train.py", "--", "--epochs", "1", "--samples", "512", "--batch-size", "64"]
    port = main_port()  # the cluster's one

    def options(rank: int) -> list[str]:
        return [
            *parameters.agent_options,
            "--main-port",
            port,
            "--rendezvous-timeout",
            "180",
            "--run-dir",
            str(tmp_path / f"run{rank}"),
            *payload,
        ]

    with (
        ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds1,
        ImdsStub(node_values("i-0", "127.0.0.1", 0, 2)) as imds0,
        BackgroundAgent(aws_env, imds1, *options(1)) as node1,
    ):
        node1.wait_for("waiting for the main node", timeout=60)
        published = datetime.now(UTC)
        ssm.put_parameter(Name=parameters.main_address, Value="127.0.0.1", Type="String")
        running = node1.wait_for("[fabric-agent] running: fabric run", timeout=60)
        time.sleep(3)  # node 0 comes later still; any delay would do
        with BackgroundAgent(aws_env, imds0, *options(0)) as node0:
            assert node0.finish(timeout=300) == 0, node0.output[-3000:]
        assert node1.finish(timeout=120) == 0, node1.output[-3000:]
    node0_started = time_of(node0.wait_for("[fabric-agent] node 0 of 2", 0), "[fabric-agent]")
    first_step = node1.wait_for("first step done", 0)  # Fabric prints on each node's first rank
    # Node 1 went into the rendezvous after the address appeared and before node 0 existed,
    # and made its first step after node 0 started, in that same fabric run (no restart).
    assert published < time_of(running, "[fabric-agent]") < node0_started
    assert node0_started < time_of(first_step, "first step done")
    assert "phase: training (restart" not in node1.output + node0.output
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"]) == (2, 2)
    assert parameters.phases(ssm) == {
        parameters.phase(0): ("done", 4),  # waiting-for-main, training, done
        parameters.phase(1): ("done", 4),
    }


MISSING_TAG = " (is the tag set and are instance metadata tags enabled?)"


@pytest.mark.parametrize(
    ("rank", "num_nodes", "expected"),
    [
        ("abc", 4, "instance tag fabric:node-rank='abc' is not an integer from 0 to 3"),
        ("-1", 4, "instance tag fabric:node-rank='-1' is not an integer from 0 to 3"),
        ("99", 4, "instance tag fabric:node-rank='99' is not an integer from 0 to 3"),
        ("1.0", 4, "instance tag fabric:node-rank='1.0' is not an integer from 0 to 3"),
        ("2", 2, "instance tag fabric:node-rank='2' is not an integer from 0 to 1"),
        (None, 2, f"IMDS has no tags/instance/fabric:node-rank{MISSING_TAG}"),
        ("1", None, f"IMDS has no tags/instance/fabric:num-nodes{MISSING_TAG}"),
        ("1", "0", "instance tag fabric:num-nodes='0' is not an integer from 1 to 64"),
    ],
    ids=["abc", "-1", "99", "1.0", "rank-equals-num-nodes", "no-rank", "no-num-nodes", "0-nodes"],
)
def test_garbage_rank_tags_are_one_line_naming_the_instance(
    aws_env, ssm, rank: str | None, num_nodes: int | str | None, expected: str
) -> None:
    """Without its rank the node cannot know its phase parameter: the line on stderr (the
    journal and, through systemd's journal+console, the EC2 console output) is all there is."""
    parameters = StackParameters.put(ssm, MAIN_IP, num_nodes=4)
    with ImdsStub(node_values("i-0123456789abcdef0", "127.0.0.9", rank, num_nodes)) as imds:
        result = run_agent(aws_env, imds, *parameters.agent_options, "--stop-when-done", "t.py")
    assert one_error_line(result) == f"error: i-0123456789abcdef0: {expected} ({NO_PHASE})"
    assert parameters.phases(ssm) == {parameters.phase(r): (INITIAL_PHASE, 1) for r in range(4)}
    assert "would stop now" in result.stdout  # on EC2 the node stops itself here too


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("not-an-ip", "'not-an-ip'"),
        ("fd00::1", "'fd00::1'"),
        (" ", "' '"),
        ("10.0.0.300", "'10.0.0.300'"),
    ],
)
def test_garbage_main_address_fails_and_records_the_phase(aws_env, ssm, value, shown) -> None:
    parameters = StackParameters.put(ssm, value, num_nodes=2)
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(aws_env, imds, *parameters.agent_options, "--stop-when-done", "t.py")
    line = f"parameter {parameters.main_address} holds {shown}, not an IPv4 address"
    assert one_error_line(result) == f"error: {line}"
    assert parameters.phases(ssm) == {
        parameters.phase(0): (INITIAL_PHASE, 1),
        parameters.phase(1): (f"failed: {line}", 3),  # waiting-for-main, then failed
    }
    assert "would stop now" in result.stdout


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("error", "answered HTTP 500 for an IMDSv2 token"),
        ("html", "answered HTML, not a value, for an IMDSv2 token"),
        ("slow", "unreachable for an IMDSv2 token: timed out"),
    ],
)
def test_imds_that_misbehaves_is_one_clear_line(aws_env, ssm, mode: str, expected: str) -> None:
    """Neither the instance nor its rank is known: the line cannot name them, nor any phase."""
    parameters = StackParameters.put(ssm, MAIN_IP, num_nodes=2)
    with ImdsStub(node_values("i-1", "127.0.0.9", 0, 1), mode=mode, slow_seconds=3) as imds:
        result = run_agent(aws_env, imds, *parameters.agent_options, "--imds-timeout", "1", "t.py")
        assert one_error_line(result) == f"error: IMDS at {imds.url} {expected} ({NO_PHASE})"
    assert parameters.phases(ssm) == {parameters.phase(r): (INITIAL_PHASE, 1) for r in range(2)}


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        (
            None,
            "error: nvidia-smi not found within 2 s: is this a GPU image with the NVIDIA driver?",
        ),
        (2, "error: nvidia-smi saw 2 of 4 GPU(s) within 2 s"),
    ],
)
def test_gpus_that_never_show_up_fail_clearly(aws_env, ssm, tmp_path: Path, gpus, expected) -> None:
    parameters = StackParameters.put(ssm, MAIN_IP, num_nodes=2)
    path = "/usr/sbin:/usr/bin:/bin" if gpus is None else fake_nvidia_smi(tmp_path, gpus)
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            {**aws_env, "PATH": path},
            imds,
            *parameters.agent_options,
            "--accelerator",
            "gpu",
            "--devices-per-node",
            "4",
            "--gpu-timeout",
            "2",
            "t.py",
        )
    assert one_error_line(result) == expected
    assert "waiting for 4 GPU(s)" in result.stdout
    assert parameters.phases(ssm) == {
        parameters.phase(0): (INITIAL_PHASE, 1),
        parameters.phase(1): (f"failed: {expected.removeprefix('error: ')}", 3),
    }


# One epoch of 32000 / (16 x 2) = 1000 steps (3 to 9 s here, idle or loaded): far more than a
# notice takes to reach the payload (a 0.2 s poll, a signal; measured: within 20 steps).
SPOT_SAMPLES = 32_000


@pytest.mark.slow
def test_spot_notice_makes_the_payload_checkpoint_and_stop(aws_env, ssm, tmp_path: Path) -> None:
    """The payload stops where the notice found it, mid-epoch, and the next run resumes there:
    not from an end-of-epoch checkpoint (the notice comes after the first step of a long first
    epoch, so the stop's own checkpoint is the only one)."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=1)
    run_dir = tmp_path / "run"
    args = [
        *parameters.agent_options,
        "--devices-per-node",
        "2",
        "--main-port",
        main_port(),
        "--spot-poll-interval",
        "0.2",
        "--run-dir",
        str(run_dir),
        "trainer/train.py",
        "--",
        "--epochs",
        "1",
        "--samples",
        str(SPOT_SAMPLES),
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--log-every",
        "1",  # every step looks for the stop request: the stop comes at the next step
    ]
    notice = '{"action": "terminate", "time": "2026-11-25T21:00:00Z"}'
    with (
        ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds,
        BackgroundAgent(aws_env, imds, *args) as agent,
    ):
        per_epoch = agent.wait_for(" steps per epoch, ", timeout=120)
        steps_per_epoch = int(re.findall(r"(\d+) steps per epoch", per_epoch)[0])
        agent.wait_for("first step done", timeout=120)  # SIGUSR1 is the payload's by now
        imds.values["spot/instance-action"] = notice
        assert agent.finish(timeout=120) == 0, agent.output[-3000:]
    out = agent.output
    assert f"spot interruption notice: {notice}" in out
    stopped = re.findall(r"stopping on request at step (\d+): saved (\S+);", out)
    assert len(stopped) == 1, out[-3000:]
    step, checkpoint = int(stopped[0][0]), stopped[0][1]
    assert 0 < step < steps_per_epoch, f"stopped at step {step} of {steps_per_epoch} per epoch"
    assert Path(checkpoint) == run_dir / "checkpoints" / f"step-{step:08d}.ckpt"
    assert not (run_dir / "summary.json").exists()
    assert parameters.phase_of(ssm, 0) == (f"interrupted: spot instance-action {notice}")

    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:  # the next run resumes
        resumed = run_agent(aws_env, imds, *args, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}\n" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps_per_epoch
    assert summary["steps_this_run"] == steps_per_epoch - step
    assert parameters.phase_of(ssm, 0) == "done"


@pytest.mark.slow
def test_a_notice_on_node_1_interrupts_the_run_and_never_completes_it(
    throttled_aws_env, throttled_moto, ssm, s3, tmp_path: Path
) -> None:
    """EC2 sends the notice to the reclaimed instance only. Node 1's payload asks for the stop,
    every rank checkpoints and exits 0: node 0, which saw no notice, must not call the run
    complete. Against an AWS that throttles a quarter of the SSM calls."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=2)
    bucket = parameters.stack.lower()
    s3.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/{parameters.stack}/run-1"
    common = [
        *parameters.agent_options,
        "--devices-per-node",
        "1",
        "--main-port",
        main_port(),
        "--spot-poll-interval",
        "0.2",
        "--peer-poll-interval",
        "1",
        "--run-name",
        "run-1",
        "--artifacts-uri",
        uri,
    ]
    script = [
        "trainer/train.py",
        "--",
        "--epochs",
        "1",
        "--samples",
        str(SPOT_SAMPLES),
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--log-every",
        "1",
    ]
    notice = '{"action": "terminate", "time": "2026-11-29T21:00:00Z"}'
    calls_before, _ = throttled_moto.throttle.snapshot()
    with (
        ImdsStub(node_values("i-0", "127.0.0.1", 0, 2)) as imds0,
        ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds1,
        BackgroundAgent(
            throttled_aws_env, imds0, *common, "--run-dir", str(tmp_path / "run"), *script
        ) as node0,
        BackgroundAgent(throttled_aws_env, imds1, *common, *script) as node1,
    ):
        node0.wait_for("first step done", timeout=180)
        imds1.values["spot/instance-action"] = notice
        assert node1.finish(timeout=180) == 0, node1.output[-3000:]
        assert node0.finish(timeout=180) == 0, node0.output[-3000:]
    calls, throttled = throttled_moto.throttle.snapshot()
    assert sum((throttled - Counter()).values()) > 0  # the run did meet throttling
    assert sum((calls - calls_before).values()) > 0
    stop = parameters.stop_value(ssm)
    assert stop == Stop("interrupted", 1, "i-1", f"spot instance-action {notice}")
    assert parameters.phase_of(ssm, 1) == f"interrupted: spot instance-action {notice}"
    phase0 = parameters.phase_of(ssm, 0)
    assert phase0.startswith(f"interrupted: {stop.describe()}; newest checkpoint "), phase0
    assert " in S3 (" in phase0, phase0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    prefix = f"{parameters.stack}/run-1/"
    assert not any(key.endswith("fabric-run.json") for key in keys), keys  # not complete
    assert not any(key.endswith("summary.json") for key in keys), keys
    assert any(key.startswith(prefix + "checkpoints/step-") for key in keys), keys  # resumable
    assert "done" not in {parameters.phase_of(ssm, 0), parameters.phase_of(ssm, 1)}


@pytest.mark.parametrize(
    ("name", "uploaded"),
    [
        ("step-00000016.ckpt", True),
        ("summary.json", True),
        ("step-00000024.ckpt.tmp", False),
        ("step-99999999.ckpt.unreadable", False),
        ("upload.partial", False),
        (".hidden", False),
    ],
)
def test_only_complete_files_are_uploaded(name: str, uploaded: bool) -> None:
    from userdata.artifacts import is_complete

    assert is_complete(Path(name)) is uploaded


def test_a_complete_run_is_reported_and_not_trained_again(aws_env, ssm, s3) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=1)
    stack = parameters.stack
    s3.create_bucket(Bucket=stack.lower())
    s3.put_object(Bucket=stack.lower(), Key=f"{stack}/fabric-run.json", Body=b'{"run": "r1"}')
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--run-name",
            "r1",
            "--artifacts-uri",
            f"s3://{stack.lower()}/{stack}",
            "--stop-when-done",
            "trainer/train.py",
        )
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = parameters.phases(ssm)[parameters.phase(0)][0]
    assert recorded == f"done: run r1 already complete (s3://{stack.lower()}/{stack}/)"
    assert "deploy with a new -c run=NAME" in result.stdout
    assert "running: " not in result.stdout  # no fabric run
    assert "would stop now" in result.stdout


WRITES_BESIDE_ITSELF = """\
import json, pathlib, sys
pathlib.Path("logs/version_0").mkdir(parents=True, exist_ok=True)
pathlib.Path("logs/version_0/events.txt").write_text(json.dumps(sys.argv[1:]))
pathlib.Path("config.yaml").write_text("changed: true\\n")
"""


@pytest.mark.slow
def test_outputs_and_the_script_arguments_are_kept_with_the_run(aws_env, ssm, s3, tmp_path) -> None:
    """What the script writes by relative path on node 0 goes to outputs/ (the shipped files
    that it leaves alone do not); a run continued without arguments gets the ones it was
    started with, a complete run given new ones trains on, given none it is complete."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=1)
    stack, bucket = parameters.stack, parameters.stack.lower()
    s3.create_bucket(Bucket=bucket)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(WRITES_BESIDE_ITSELF)
    (project / "config.yaml").write_text("changed: false\n")
    (project / "data.txt").write_text("shipped, left alone\n")

    def deploy(*script_args: str) -> subprocess.CompletedProcess[str]:
        with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
            return run_agent(
                aws_env,
                imds,
                *parameters.agent_options,
                *("--devices-per-node", "1", "--main-port", main_port(), "--run-name", "r1"),
                *("--run-dir", str(tmp_path / "run"), "--workdir", str(project)),
                *("--artifacts-uri", f"s3://{bucket}/{stack}", "--run-fingerprint", "f" * 64),
                "train.py",
                "--",
                *script_args,
                timeout=120,
            )

    def events() -> list[str]:
        body = s3.get_object(Bucket=bucket, Key=f"{stack}/outputs/logs/version_0/events.txt")
        return json.loads(body["Body"].read())

    first = deploy("--epochs", "60")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    keys = {
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{stack}/outputs/")["Contents"]
    }
    assert keys == {f"{stack}/outputs/logs/version_0/events.txt", f"{stack}/outputs/config.yaml"}
    assert events() == ["--epochs", "60"]
    (project / "config.yaml").write_text("changed: false\n")  # a new cluster: as it shipped
    again = deploy()  # complete, and continued with the arguments it had: nothing to train
    assert "already complete" in again.stdout, again.stdout[-3000:]
    assert "continued with its recorded arguments: --epochs 60" in again.stdout
    more = deploy("--epochs", "80")  # more epochs: trains on
    assert more.returncode == 0 and "already complete" not in more.stdout
    assert events() == ["--epochs", "80"]
    marker = json.loads(s3.get_object(Bucket=bucket, Key=f"{stack}/fabric-run.json")["Body"].read())
    assert marker["script_args"] == ["--epochs", "80"]
    # Not restored into the run directory: they are the working directory's.
    assert not (tmp_path / "run" / "outputs").exists()


@pytest.mark.slow
def test_a_failed_peer_stops_this_node_at_once(aws_env, ssm) -> None:
    """Node 1 waits in the rendezvous for a node 0 that will never come (it failed in its
    boot): without the watch, every restart would wait the whole rendezvous timeout."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=2)  # nothing listens there
    with (
        ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds,
        BackgroundAgent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--devices-per-node",
            "1",
            "--main-port",
            main_port(),
            "--rendezvous-timeout",
            "600",
            "--max-restarts",
            "3",
            "--peer-poll-interval",
            "1",
            "--stop-when-done",
            "trainer/train.py",
        ) as agent,
    ):
        agent.wait_for("phase: training", timeout=60)
        reason = "install: Because nope was not found in the package registry"
        # Node 0's boot fails as boot.sh records it: its phase, and the cluster's stop.
        with ImdsStub(node_values("i-0", "127.0.0.1", 0, 2)) as imds0:
            report = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "userdata.report",
                    "--phase-parameter",
                    phase_parameter_template(parameters.stack),
                    "--members-parameter",
                    parameters.members,
                    "--stop-parameter",
                    parameters.stop,
                    f"failed: {reason}",
                ],
                cwd=PROJECT_DIR,
                env={**aws_env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds0.url},
                capture_output=True,
                text=True,
                check=True,
            )
        failed_at = time.monotonic()
        status = agent.finish(timeout=60)
        elapsed = time.monotonic() - failed_at
    assert status == 1, agent.output[-3000:] + report.stderr
    assert elapsed < 20  # the poll interval, then stopping fabric run
    assert parameters.stop_value(ssm) == Stop("failed", 0, "i-0", reason)
    assert parameters.phase_of(ssm, 0) == f"failed: {reason}"
    assert parameters.phases(ssm)[parameters.phase(1)][0] == f"failed: node 0 failed ({reason})"
    assert "restart 1 of 3" not in agent.output  # not started again for a dead peer
    assert "would stop now" in agent.output


@pytest.mark.slow
def test_a_stop_from_another_deploy_is_ignored(aws_env, ssm) -> None:
    """CloudFormation runs a redeploy's old and new nodes side by side: an old node's stop (its
    instance is not among the members) does not stop the new cluster."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=2)
    old = Stop("failed", 0, "i-old", "fabric run exited with status 1")
    ssm.put_parameter(Name=parameters.stop, Value=old.encode(), Type="String", Overwrite=True)
    # An old agent's last phase, written after this node booted, in the rank's parameter.
    ssm.put_parameter(
        Name=parameters.phase(0), Value=f"failed: {old.reason}", Type="String", Overwrite=True
    )
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--main-port",
            main_port(),
            "--peer-poll-interval",
            "1",
            "--rendezvous-timeout",
            "3",
            "--max-restarts",
            "1",
            "--restart-delay",
            "0",
            "trainer/train.py",
            timeout=120,
        )
    # It trained as far as it could (nobody listens at node 0) and was restarted: not stopped.
    assert "restart 1 of 1" in result.stdout, result.stdout[-3000:]
    assert "the cluster stops" not in result.stdout


@pytest.mark.slow
def test_a_stop_from_outside_is_recorded_as_what_it_was(aws_env, ssm) -> None:
    """max_hours' power-off (systemd's SIGTERM to the whole unit): not `failed: fabric run
    exited with status ... after 3 restart(s)`, but what happened, and the cluster is told, so
    that no other node restarts into a rendezvous this one will never join."""
    parameters = StackParameters.put(ssm, "127.0.0.1", num_nodes=1)
    with (
        ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds,
        BackgroundAgent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--main-port",
            main_port(),
            "--max-hours",
            "0.001",
            "--max-restarts",
            "3",
            "trainer/train.py",
            "--",
            "--epochs",
            "1",
            "--samples",
            str(SPOT_SAMPLES),
            "--batch-size",
            "16",
        ) as agent,
    ):
        agent.wait_for("first step done", timeout=120)
        os.killpg(agent.process.pid, signal.SIGTERM)  # systemd stops every process of the unit
        assert agent.finish(timeout=60) == 0, agent.output[-3000:]
    reason = "max_hours=0.001 reached: the node powers off (cost guard)"
    assert parameters.phase_of(ssm, 0) == f"interrupted: {reason}"
    assert parameters.stop_value(ssm) == Stop("interrupted", 0, "i-0", reason)
    assert "restart 1 of 3" not in agent.output


def test_sigterm_before_max_hours_is_a_stop_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    from userdata import stop_handling

    monkeypatch.setattr(stop_handling, "AGENT_STARTED", time.monotonic() - 3600)  # an hour in
    assert stop_handling.stopped_from_outside(4).startswith("stopped from outside (SIGTERM")
    assert stop_handling.stopped_from_outside(0).startswith("stopped from outside (SIGTERM")
    assert stop_handling.stopped_from_outside(1).startswith("max_hours=1 reached")

"""The node agent against real HTTP servers: moto (SSM, S3) and an IMDSv2 stub, on 127.0.0.1."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rehearsal.imds_stub import ImdsStub, node_values
from stacks.config import PROJECT_DIR, main_address_parameter, phase_parameter_template
from userdata.fabric_command import fabric_environment, fabric_run_command

MAIN_IP = "127.0.0.2"  # routed through lo, like a peer's address through eth0 on EC2


def parameter_name() -> str:
    return main_address_parameter(f"Test{uuid.uuid4().hex[:8]}")


@dataclass
class StackParameters:
    """A fresh stack's SSM parameters, named as the template names them."""

    stack: str

    @classmethod
    def put(cls, ssm: Any, main_address: str) -> StackParameters:
        parameters = cls(f"Test{uuid.uuid4().hex[:8]}")
        ssm.put_parameter(Name=parameters.main_address, Value=main_address, Type="String")
        return parameters

    @property
    def main_address(self) -> str:
        return main_address_parameter(self.stack)

    def phase(self, rank: int) -> str:
        return phase_parameter_template(self.stack).format(rank=rank)

    @property
    def agent_options(self) -> list[str]:
        return [
            "--main-address-parameter",
            self.main_address,
            "--phase-parameter",
            phase_parameter_template(self.stack),
        ]


def run_agent(
    env: dict[str, str], imds: ImdsStub, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
    return subprocess.run(
        [sys.executable, "-m", "userdata.agent", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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
    lines = result.stdout.splitlines()
    command = next(line for line in lines if line.startswith("fabric run "))
    assert shlex.split(command) == [
        "fabric",
        "run",
        f"--node-rank={rank}",
        f"--main-address={MAIN_IP}",
        "--main-port=29555",
        "--accelerator=cpu",
        "--devices=2",
        f"--num-nodes={num_nodes}",
        "--precision=32-true",
        "trainer/train.py",
        "--epochs",
        "3",
        "--run-name",
        "a b",
    ]
    environment = dict(line.split("=", 1) for line in lines[lines.index(command) + 1 :])
    assert environment["GLOO_SOCKET_IFNAME"] == "lo"
    assert "NCCL_SOCKET_IFNAME" not in environment
    assert int(environment["OMP_NUM_THREADS"]) >= 1
    assert environment["PET_RDZV_CONF"] == "timeout=600"
    assert not {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA"} & environment.keys()  # no --efa
    assert "would stop now" not in result.stdout  # no --stop-when-done given


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
    assert "NCCL_SOCKET_IFNAME=lo" in result.stdout.splitlines()
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
            "--main-address-parameter",
            name,
            "train.py",
        )
    assert result.returncode == 0, result.stderr
    command, environment = dry_run_environment(result.stdout)
    assert command[-3:] == ["--num-nodes=2", "--precision=bf16-mixed", "train.py"]
    # The AMI's EFA libraries first, what the service inherited kept behind them.
    efa_libraries = "/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"
    assert environment["LD_LIBRARY_PATH"] == f"{efa_libraries}:/usr/x/lib"
    assert environment["FI_PROVIDER"] == "efa"
    assert environment["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert environment["NCCL_SOCKET_IFNAME"] == "lo"


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
    assert command[-5:] == ["--num-nodes=2", "--precision=16-mixed", "train.py", "--epochs", "3"]
    launched = command_for(launcher=["python", "-m", "lightning.fabric.cli"])
    assert launched[:4] == ["python", "-m", "lightning.fabric.cli", "--node-rank=1"]


def efa_environment(
    monkeypatch: pytest.MonkeyPatch, efa: bool, inherited: str | None
) -> dict[str, str]:
    if inherited is None:
        monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    else:
        monkeypatch.setenv("LD_LIBRARY_PATH", inherited)
    return fabric_environment(
        interface="ens5", accelerator="gpu", threads=4, rendezvous_timeout=600, efa=efa
    )


def test_efa_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    efa_libraries = "/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"
    alone = efa_environment(monkeypatch, True, None)
    assert alone["LD_LIBRARY_PATH"] == efa_libraries  # no empty entry (the current directory)
    assert (alone["FI_PROVIDER"], alone["FI_EFA_USE_DEVICE_RDMA"]) == ("efa", "1")
    inherited = efa_environment(monkeypatch, True, "/a:/b")
    assert inherited["LD_LIBRARY_PATH"] == f"{efa_libraries}:/a:/b"
    without = efa_environment(monkeypatch, False, "/a")
    assert not {"LD_LIBRARY_PATH", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA"} & without.keys()
    assert without["NCCL_SOCKET_IFNAME"] == "ens5"


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


def test_waits_for_a_parameter_that_appears_after_3_s(aws_env, ssm) -> None:
    name = parameter_name()
    timer = threading.Timer(3.0, lambda: ssm.put_parameter(Name=name, Value=MAIN_IP, Type="String"))
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        timer.start()
        started = time.monotonic()
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--main-address-parameter",
            name,
            "--main-address-timeout",
            "30",
            "train.py",
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"waiting for the main node: {name} not there yet" in result.stdout
    assert f"--main-address={MAIN_IP}" in result.stdout
    assert 3.0 <= elapsed < 20


def test_parameter_that_never_appears_fails_within_the_bound(aws_env) -> None:
    name = parameter_name()
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        started = time.monotonic()
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--main-address-parameter",
            name,
            "--main-address-timeout",
            "4",
            "train.py",
        )
        elapsed = time.monotonic() - started
    assert one_error_line(result) == (
        f"error: parameter {name} did not appear within 4 s: the main node (node 0) never "
        "published its address"
    )
    assert elapsed < 15


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            node_values("i-1", "127.0.0.9", None, 2),
            "error: IMDS has no tags/instance/fabric:node-rank (is the tag set and are instance "
            "metadata tags enabled?)",
        ),
        (
            node_values("i-1", "127.0.0.9", 1, None),
            "error: IMDS has no tags/instance/fabric:num-nodes (is the tag set and are instance "
            "metadata tags enabled?)",
        ),
        (
            node_values("i-1", "127.0.0.9", 2, 2),
            "error: instance tag fabric:node-rank='2' is not an integer from 0 to 1",
        ),
        (
            node_values("i-1", "127.0.0.9", 7, 4),
            "error: instance tag fabric:node-rank='7' is not an integer from 0 to 3",
        ),
    ],
    ids=["missing-rank", "missing-num-nodes", "rank-equals-num-nodes", "rank-beyond"],
)
def test_bad_or_missing_tags(aws_env, values: dict[str, str], expected: str) -> None:
    with ImdsStub(values) as imds:
        result = run_agent(aws_env, imds, "--dry-run", "--main-address-parameter", "/x/y", "t.py")
    assert one_error_line(result) == expected


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


def test_node0_refuses_a_stale_main_address(aws_env, ssm) -> None:
    name = parameter_name()
    ssm.put_parameter(Name=name, Value="127.0.0.3", Type="String")
    with ImdsStub(node_values("i-0", MAIN_IP, 0, 2)) as imds:
        result = run_agent(aws_env, imds, "--dry-run", "--main-address-parameter", name, "t.py")
    assert one_error_line(result) == (
        f"error: parameter {name} says 127.0.0.3, but this node 0 has {MAIN_IP}"
    )


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
def test_real_run_records_phases_and_uploads_artifacts(
    aws_env, ssm, s3, tmp_path: Path, exit_status: int
) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    stack = parameters.stack
    s3.create_bucket(Bucket=stack.lower())
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
            "29581",
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
    recorded = ssm.get_parameter(Name=parameters.phase(0))["Parameter"]["Value"]
    if exit_status == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        assert recorded == "done"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.lower()).get("Contents", [])]
        assert keys == [f"{stack}/rank0.txt"]  # the temporary file is never uploaded
    else:
        assert result.returncode != 0
        assert recorded.startswith("failed: fabric run exited with status")
    assert "phase: waiting-for-main" in result.stdout and "phase: training" in result.stdout
    assert "would stop now (not powering off: not started by the boot script" in result.stdout


FLAKY_SCRIPT = """\
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("failed once")
    sys.exit(1)
"""


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
            "29582",
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
    assert "fabric run exited with status 1: restart 1 of 2" in result.stdout
    assert "phase: training (restart 1)" in result.stdout
    assert ssm.get_parameter(Name=parameters.phase(0))["Parameter"]["Value"] == "done"


def test_main_node_that_never_comes_fails_within_the_rendezvous_bound(aws_env, ssm) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")  # nothing listens there
    ssm.put_parameter(Name=parameters.phase(1), Value="booting", Type="String")
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        started = time.monotonic()
        result = run_agent(
            aws_env,
            imds,
            *parameters.agent_options,
            "--devices-per-node",
            "1",
            "--main-port",
            "29583",
            "--rendezvous-timeout",
            "5",
            "--max-restarts",
            "0",
            "--stop-when-done",
            "trainer/train.py",
            timeout=120,
        )
        elapsed = time.monotonic() - started
    # fabric run's own output (torchrun's traceback) is streamed; the agent's verdict is one line.
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1] == "error: fabric run exited with status 1"
    assert "The client socket has timed out after 5000ms" in result.stderr
    recorded = ssm.get_parameter(Name=parameters.phase(1))["Parameter"]["Value"]
    assert recorded == "failed: fabric run exited with status 1"
    assert "would stop now" in result.stdout  # on EC2 the node stops itself here
    assert elapsed < 60


@pytest.mark.parametrize(
    ("rank", "expected"),
    [("abc", "'abc'"), ("-1", "'-1'"), ("99", "'99'"), ("1.0", "'1.0'")],
)
def test_garbage_rank_tags(aws_env, rank: str, expected: str) -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", rank, 4)) as imds:
        result = run_agent(aws_env, imds, "--dry-run", "--main-address-parameter", "/x/y", "t.py")
    assert one_error_line(result) == (
        f"error: instance tag fabric:node-rank={expected} is not an integer from 0 to 3"
    )


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
    parameters = StackParameters.put(ssm, value)
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(aws_env, imds, *parameters.agent_options, "t.py")
    line = f"parameter {parameters.main_address} holds {shown}, not an IPv4 address"
    assert one_error_line(result) == f"error: {line}"
    recorded = ssm.get_parameter(Name=parameters.phase(1))["Parameter"]["Value"]
    assert recorded == f"failed: {line}"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("error", "answered HTTP 500 for an IMDSv2 token"),
        ("html", "answered HTML, not a value, for an IMDSv2 token"),
        ("slow", "unreachable for an IMDSv2 token: timed out"),
    ],
)
def test_imds_that_misbehaves_is_one_clear_line(aws_env, mode: str, expected: str) -> None:
    with ImdsStub(node_values("i-1", "127.0.0.9", 0, 1), mode=mode, slow_seconds=3) as imds:
        result = run_agent(
            aws_env,
            imds,
            "--dry-run",
            "--imds-timeout",
            "1",
            "--main-address-parameter",
            "/x/y",
            "t.py",
        )
        assert one_error_line(result) == f"error: IMDS at {imds.url} {expected}"


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
def test_gpus_that_never_show_up_fail_clearly(aws_env, tmp_path: Path, gpus, expected) -> None:
    path = "/usr/sbin:/usr/bin:/bin" if gpus is None else fake_nvidia_smi(tmp_path, gpus)
    with ImdsStub(node_values("i-1", "127.0.0.9", 1, 2)) as imds:
        result = run_agent(
            {**aws_env, "PATH": path},
            imds,
            "--dry-run",
            "--accelerator",
            "gpu",
            "--devices-per-node",
            "4",
            "--gpu-timeout",
            "2",
            "--main-address-parameter",
            "/x/y",
            "t.py",
        )
    assert one_error_line(result) == expected
    assert "waiting for 4 GPU(s)" in result.stdout


def test_spot_notice_makes_the_payload_checkpoint_and_stop(aws_env, ssm, tmp_path: Path) -> None:
    parameters = StackParameters.put(ssm, "127.0.0.1")
    phase = parameters.phase(0)
    run_dir = tmp_path / "run"
    args = [
        *parameters.agent_options,
        "--devices-per-node",
        "2",
        "--main-port",
        "29584",
        "--spot-poll-interval",
        "0.2",
        "--run-dir",
        str(run_dir),
        "trainer/train.py",
        "--",
        "--epochs",
        "40",
        "--samples",
        "4096",
        "--batch-size",
        "64",  # 32 steps per epoch: training lasts long enough for the notice to arrive
    ]
    notice = '{"action": "terminate", "time": "2026-11-25T21:00:00Z"}'
    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:
        process = subprocess.Popen(
            [sys.executable, "-m", "userdata.agent", *args],
            cwd=PROJECT_DIR,
            env={**aws_env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-*.ckpt")):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        imds.values["spot/instance-action"] = notice
        out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    assert f"spot interruption notice: {notice}" in out
    assert "stopping on request at step" in out
    assert not (run_dir / "summary.json").exists()
    assert ssm.get_parameter(Name=phase)["Parameter"]["Value"] == (
        f"interrupted: spot instance-action {notice}"
    )

    with ImdsStub(node_values("i-0", "127.0.0.1", 0, 1)) as imds:  # the next run resumes
        resumed = run_agent(aws_env, imds, *args, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 * 32 and summary["steps_this_run"] < summary["steps"]
    assert ssm.get_parameter(Name=phase)["Parameter"]["Value"] == "done"

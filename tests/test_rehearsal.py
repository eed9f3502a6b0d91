"""The rehearsal: the real template on moto, every node's real user data in its own namespace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rehearsal.namespaces import namespaces_available
from stacks.config import PROJECT_DIR

REASON = namespaces_available()
pytestmark = pytest.mark.skipif(
    REASON == "this platform has no network namespaces", reason=str(REASON)
)
NETNS_DIR = Path("/run/netns")


def network_namespace_of(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def network_namespace(pid: int | str) -> int | None:
    return network_namespace_of(Path(f"/proc/{pid}/ns/net"))


ROOT_NAMESPACE = network_namespace("self")  # the test runs in the root namespace


class Process:
    """What /proc says of one process."""

    def __init__(self, entry: Path) -> None:
        # state, parent, process group, session: after the command name, which may hold spaces
        state, parent, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        self.zombie = state == "Z"
        self.parent, self.session = int(parent), int(session)
        self.environment = (entry / "environ").read_bytes().split(b"\0")
        self.command = (
            (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
        self.net = network_namespace(entry.name)


def live_processes() -> dict[int, Process]:
    """Every live process but this one, zombies left out."""
    found: dict[int, Process] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            process = Process(entry)
        except OSError:
            continue
        if not process.zombie:
            found[int(entry.name)] = process
    return found


def rehearsal(tmp_path: Path, *args: str) -> tuple[list[str], dict[str, str], Path]:
    """A rehearsal's command and environment; it writes what it makes to the returned manifest
    and its temporary files (its work folder among them) under tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    manifest = tmp_path / "manifest.json"
    command = [sys.executable, "-m", "rehearsal.run", "--manifest", str(manifest), *args]
    return command, {**os.environ, "TMPDIR": str(tmp_path / "tmp")}, manifest


def leftovers(manifest_path: Path) -> dict[str, list[str]]:
    """What a finished rehearsal left, found by the names and the id it wrote in its manifest."""
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    namespaces: dict[str, int] = manifest.get("namespaces", {})
    inodes = {inode: name for name, inode in namespaces.items()}
    for other in NETNS_DIR.iterdir() if NETNS_DIR.exists() else []:
        if other.name not in namespaces:  # a new namespace given a freed inode of the run's
            inodes.pop(network_namespace_of(other), None)
    found: dict[str, list[str]] = {}
    for pid, process in live_processes().items():
        if manifest["marker"].encode() in process.environment:
            where = "the root" if process.net == ROOT_NAMESPACE else f"net:[{process.net}]"
            found.setdefault("processes", []).append(f"{pid} in {where}: {process.command}")
        if process.net in inodes:  # a namespace lives on, deleted, while a process is inside it
            held = f"{inodes[process.net]}: {pid} {process.command}"
            found.setdefault("held namespaces", []).append(held)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    names |= {entry.name for entry in NETNS_DIR.iterdir()} if NETNS_DIR.exists() else set()
    found["namespaces"] = sorted(names & set(namespaces))
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    root_links = {line.split(": ")[1].split("@")[0] for line in links.stdout.splitlines()}
    found["links"] = sorted(root_links & set(manifest.get("links", [])))
    found["files"] = [str(path) for path in manifest_path.parent.joinpath("tmp").iterdir()]
    for folder in (manifest["work_folder"], manifest.get("socket_folder")):
        if folder and Path(folder).exists():
            found["files"].append(folder)
    return {kind: items for kind, items in found.items() if items}


def rehearse(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """A rehearsal run to its end, which must pass: its output and its manifest."""
    command, env, manifest = rehearsal(tmp_path, *args)
    result = subprocess.run(
        command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout, manifest


@pytest.mark.parametrize(
    ("nodes", "devices", "main_delay", "project"),
    [
        # The example project of examples/: the nodes' real install phases (offline, from the
        # uv cache that installing it here filled), its uv.lock less torch's CUDA wheels.
        # examples/charlm, a late main node, then runs: watched with make status, logs and
        # results, resumed by a new cluster from S3, complete, and a new one beside it.
        (2, 1, 5, ["--project", "examples/charlm", "--script", "train.py", "--runs"]),
        # The default project (trainer/, in this venv) runs in the interrupted rehearsal below.
    ],
)
def test_rehearsal_trains_across_namespaces_and_destroys(
    nodes: int, devices: int, main_delay: int, project: list[str], tmp_path: Path
) -> None:
    assert REASON is None, REASON  # CI runs as root with iproute2 (.ci/run installs it)
    command, env, manifest = rehearsal(
        tmp_path,
        "--num-nodes",
        str(nodes),
        "--devices-per-node",
        str(devices),
        "--main-node-delay",
        str(main_delay),
        *project,
        "--",
        *(
            ["--max-steps", "30"]
            if "--project" in project
            else ["--epochs", "1", "--samples", "2048"]
        ),
    )
    process = subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:] + err[-4000:]
    assert f"world size {nodes * devices};" in out
    assert "the same result as the local cluster, bit for bit" in out
    assert "after destroy only the artifacts bucket remains" in out
    assert "no node binds gloo/NCCL to lo" in out  # node 0 binds its own address's interface
    assert "answered ThrottlingException" in out  # and every phase was recorded all the same
    for rank in range(nodes):
        assert f"[node {rank}] [fabric-agent] phase: done" in out
        assert f"[node {rank}] [fabric-agent] would stop now" in out
    if "--runs" in project:
        for check in (
            "make status, logs and results: every node done",
            "a new cluster resumed run",
            "every node says it is complete, and nothing trained",
            "(make runs lists both)",
            # The storage outlives the cluster: found after destroy, then deleted on request.
            "the runs of cluster FabricCluster are still listed",
            "make destroy-storage deleted what it said",
        ):
            assert check in out
    if "--project" in project:
        installed = re.findall(
            r"^\[node (\d)\] .*\[fabric-install\] done: .*, no CUDA library\)$", out, re.M
        )
        assert set(installed) == {str(rank) for rank in range(nodes)}
    else:
        assert "REHEARSAL: using the venv" in out
    if main_delay:  # the other nodes waited for the main node, then trained with it
        assert f"node 0 boots in {main_delay} s" in out
    assert "stopped a stray process" not in out  # a run that ends well stops everything itself
    assert len(json.loads(manifest.read_text())["namespaces"]) == nodes + 1
    assert leftovers(manifest) == {}


@pytest.mark.parametrize("sharded", [[], ["--sharded"]], ids=["one-file", "sharded"])
def test_every_rank_resumes_after_a_restart_and_on_a_new_cluster(
    sharded: list[str], tmp_path: Path
) -> None:
    """examples/guide_resume checkpoints as Fabric's guide does: fabric.save, and every rank
    loads the newest checkpoint; one file from rank 0, or (--sharded, FSDP2) a shard of every
    rank in one folder. Each node has its own disk; the cluster's file system (one folder in
    every node's namespace) holds the run directory. Node 1 fails at step 7: after the
    cluster's restart both nodes' ranks resume from step 5. A new cluster then resumes the run
    from S3 at step 10 on every rank, with the replicas equal (sharded: every rank's shard in
    S3)."""
    assert REASON is None, REASON
    out, manifest = rehearse(
        tmp_path,
        *("--num-nodes", "2", "--devices-per-node", "1", "--restarted", "--train-on"),
        *("--project", "examples/guide_resume", "--script", "train.py"),
        *("--", "--max-steps", "10", "--fail-once-at", "7", *sharded),
    )
    assert "every node's run directory is the cluster's shared one" in out
    assert "[node 1] rank 1: node 1 fails at step 7" in out
    assert "every node restarted, all 2 ranks resumed from step 5 and ended at 10" in out
    assert "on all 2 ranks from step 10 to 20; every replica ends with the same weights" in out
    for rank in range(2):  # the script's own words, on each node
        for step in (5, 10):
            assert f"[node {rank}] rank {rank}: resumed from step {step}" in out
    if sharded:
        assert "sharded checkpoint(s) in S3, each with the shards of all 2 ranks" in out
    assert leftovers(manifest) == {}


def test_a_node_0_lost_without_notice_is_replaced_and_the_cluster_goes_on(tmp_path: Path) -> None:
    """recover=true: a group of one instance per rank (moto's Auto Scaling launches them from
    the launch template, the rank a propagated tag); node 0 publishes its address and the
    first generation at boot. Once the run has a checkpoint, node 0's instance is terminated
    and its processes killed (no notice); its group launches a replacement with a new
    address, which publishes generation 2; node 1 follows it, and every rank resumes from the
    same checkpoint to the end, bit for bit as a local run; each node then leaves its group."""
    assert REASON is None, REASON
    out, manifest = rehearse(
        tmp_path,
        *("--recover", "--lose-node", "0", "--devices-per-node", "1"),
        *("--project", "examples/guide_resume", "--script", "train.py"),
        *("--", "--max-steps", "200", "--checkpoint-every", "20"),
    )
    assert "a group of one instance per rank" in out
    assert "lost without notice: its instance terminated" in out
    assert "[node 1] " in out and "generation 2 (complete): fabric run stops, to start again" in out
    replaced = re.search(
        r"node 0 lost \((i-\w+)\); its replacement (i-\w+) \((10\.42\.0\.\d+)\) joined; all 2 "
        r"ranks resumed from step (\d+) and ended at 200 with the same weights",
        out,
    )
    assert replaced and int(replaced.group(4)) >= 20, out[-3000:]
    assert f"node 0 published {replaced.group(3)} and generation 2 (2:{replaced.group(2)}," in out
    assert "all 2 group(s) at zero after the run" in out
    assert "the same result as the local cluster, bit for bit" in out
    assert leftovers(manifest) == {}


def test_a_spot_notice_with_recover_checkpoints_replaces_the_node_and_loses_no_step(
    tmp_path: Path,
) -> None:
    """recover=true: a spot notice on node 1 mid-epoch: every rank checkpoints at that step,
    node 1 hands its instance back to its group, which launches the replacement at once (not
    when EC2 reclaims it); node 0 publishes generation 2 and the cluster resumes from the
    notice's step, bit for bit as an uninterrupted local run (no step lost)."""
    assert REASON is None, REASON
    out, manifest = rehearse(
        tmp_path,
        *("--recover", "--spot-node", "1", "--devices-per-node", "1"),
        *("--", "--epochs", "1", "--samples", "40000", "--batch-size", "16", "--hidden", "32"),
        *("--log-every", "1"),
    )
    assert "spot interruption notice to node 1 (to it alone, as EC2 sends it)" in out
    assert "this node's group terminates it and launches its replacement now" in out
    assert "[node 0] [fabric-agent] phase: waiting: node 1 interrupted (spot " in out
    replaced = re.search(
        r"node 1 gave way after its spot notice \(i-\w+\); its replacement i-\w+ "
        r"\(10\.42\.0\.\d+\) joined; the run resumed from step (\d+) and ended at 1250",
        out,
    )
    assert replaced and 0 < int(replaced.group(1)) < 1250, out[-3000:]
    stopped = re.search(r"\[node 0\] stopping on request at step (\d+): saved ", out)
    assert stopped and stopped.group(1) == replaced.group(1)  # no step lost
    assert "the same result as the local cluster, bit for bit" in out
    assert leftovers(manifest) == {}


def test_past_max_replacements_the_run_fails_with_the_reason_and_nothing_bills(
    tmp_path: Path,
) -> None:
    """max_replacements=0: node 1 lost, its group's replacement boots, and the run gives up:
    every node records why (the replacement included), and every group ends at zero."""
    assert REASON is None, REASON
    out, manifest = rehearse(
        tmp_path,
        *("--recover", "--lose-node", "1", "--max-replacements", "0", "--devices-per-node", "1"),
        *("--project", "examples/guide_resume", "--script", "train.py"),
        *("--", "--max-steps", "200", "--checkpoint-every", "20"),
    )
    assert "node 1 (i-" in out and "lost without notice" in out
    assert (
        "past max_replacements every node recorded 'more than max_replacements=0 replacements "
        "in this run'; every group at zero"
    ) in out
    assert leftovers(manifest) == {}


def wait_for_workers(
    manifest_path: Path, process: subprocess.Popen[str], count: int, timeout: float = 240
) -> dict[int, Process]:
    """The training workers of a running rehearsal, once `count` of them run in its nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the rehearsal ended before its workers started"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            namespaces = set(manifest.get("namespaces", {}).values())
            running = {
                pid: candidate
                for pid, candidate in live_processes().items()
                if manifest["marker"].encode() in candidate.environment
                and candidate.net in namespaces
                and "train.py" in candidate.command
            }
            # Not the agent or `fabric run` (torchrun): the workers, each in a session of its own.
            workers = {
                pid: p for pid, p in running.items() if p.parent in running and p.session == pid
            }
            if len(workers) >= count:
                return workers
        time.sleep(0.2)
    raise AssertionError(f"no {count} training workers within {timeout:g} s")


def test_an_interrupted_rehearsal_removes_everything_it_made(tmp_path: Path) -> None:
    """SIGTERM once the training workers run: they are what is most likely left, in a session
    of their own (torchrun's), and inside namespaces that live on while they do.

    One node's torchrun and worker are stopped first, as stuck ones would be: torchrun dies
    (SIGKILL, after the grace period) without stopping its worker, which is in no process
    group the rehearsal stops. Only the rehearsal's sweep for its id can stop that worker."""
    assert REASON is None, REASON
    command, env, manifest = rehearsal(
        tmp_path,
        "--num-nodes",
        "2",
        "--devices-per-node",
        "1",
        "--",
        "--epochs",
        "1000",  # still training when the signal comes
        "--samples",
        "4096",
    )
    log = tmp_path / "out.log"
    with log.open("w") as out:  # a file: a pipe would fill up while the test waits
        process = subprocess.Popen(
            command, cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
    try:
        workers = wait_for_workers(manifest, process, count=2)
        work_folder = json.loads(manifest.read_text())["work_folder"]
        for worker in workers.values():  # so their files (torchrun's logs) go with the folder
            assert f"TMPDIR={work_folder}/tmp".encode() in worker.environment
        worker, worker_process = next(iter(workers.items()))
        stuck = [worker_process.parent, worker]  # torchrun first: it must not see its worker stop
        for pid in stuck:
            os.kill(pid, signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    try:
        assert process.returncode == 130, output[-4000:]
        assert "[rehearsal] interrupted; everything it made is removed" in output
        assert leftovers(manifest) == {}
        assert f"[rehearsal] cleanup: stopped a stray process {worker}: " in output
    finally:  # the stopped ones, should the rehearsal have missed them
        marker = json.loads(manifest.read_text())["marker"].encode()
        for pid in stuck:
            left = live_processes().get(pid)
            if left and marker in left.environment:
                os.kill(pid, signal.SIGKILL)


def test_a_node_whose_install_fails_stops_the_others_at_once(tmp_path: Path) -> None:
    """Node 1's install step finds no torch: it records the installer's message; node 0, which
    would wait out the rendezvous for it on every restart, stops within the bound instead."""
    assert REASON is None, REASON
    out, manifest = rehearse(
        tmp_path,
        *("--num-nodes", "2", "--devices-per-node", "1", "--fail-node", "1"),
        *("--project", "examples/charlm", "--script", "train.py", "--", "--max-steps", "30"),
    )
    assert "node 1's install failed (failed: install: torch: " in out
    assert "every other node stopped within" in out
    assert "[node 0] [fabric-agent] phase: failed: node 1 failed (install: torch: " in out
    assert "[node 0] [fabric-agent] would stop now" in out
    assert "after destroy only the artifacts bucket remains" in out
    assert leftovers(manifest) == {}


def test_a_spot_notice_on_node_1_interrupts_the_run_and_a_new_cluster_resumes_it(
    tmp_path: Path,
) -> None:
    """EC2 sends the notice to the reclaimed instance only. Every node, node 0 included, records
    the run as interrupted (never done), the newest checkpoint reaches S3 first, the run is not
    marked complete, and a new cluster resumes it; through an AWS that throttles SSM."""
    assert REASON is None, REASON
    command, env, manifest = rehearsal(
        tmp_path,
        *("--num-nodes", "2", "--devices-per-node", "1", "--spot-node", "1"),
        *("--", "--epochs", "1", "--samples", "40000", "--batch-size", "16", "--hidden", "32"),
        *("--log-every", "1"),
    )
    result = subprocess.run(
        command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "spot interruption notice to node 1 (to it alone, as EC2 sends it)" in out
    assert "a notice on node 1 interrupted every node; no node said done; checkpoint in S3" in out
    assert "[node 0] [fabric-agent] phase: interrupted: node 1 interrupted (spot " in out
    assert "a new cluster resumed the interrupted run from step " in out
    assert "no node binds gloo/NCCL to lo" in out
    throttled = re.findall(r"the nodes met an AWS that throttles: (\d+) of (\d+) ", out)
    assert throttled and all(int(refused) > 0 for refused, _ in throttled), throttled
    assert leftovers(manifest) == {}


def test_data_env_and_a_secret_reach_every_rank_and_the_secret_shows_nowhere(
    tmp_path: Path,
) -> None:
    """A data channel in the emulated S3, a variable and a SecureString: the example trains on
    the channel (bit for bit as the local cluster on the same files) and reads both; every node
    holds the files on its own disk; a second start copies nothing, a change in S3 only what
    changed; the secret's value is in no file, log event, parameter, object, template or line
    of make status and make logs, and the script's own print of it is masked."""
    assert REASON is None, REASON
    out, manifest = rehearse(tmp_path, "--inputs", "--devices-per-node", "1")
    assert "trained on channel train (2048 samples) and read REHEARSAL_NOTE and HF_TOKEN" in out
    assert "every node holds the same 2 file(s) on its own disk" in out
    assert "a second start copied 0 of 2 file(s) on every node; after a change in S3, 1" in out
    assert "the script's print of it reads 'env HF_TOKEN=********'" in out
    assert "[node 0] [fabric-agent] phase: reading-secrets" in out
    assert "the same result as the local cluster, bit for bit" in out
    assert leftovers(manifest) == {}

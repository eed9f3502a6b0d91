"""`make local ARGS="--project DIR --script FILE"`: a user's project installed by the nodes' own
install step into a venv of its own (cached), then trained by 2 nodes x 1 device.

Each project imports a package that no node requirement has, a module of its own, and reads a
data file by a relative path. The installs reach PyPI (as test_install does); uv's cache is
shared with test_install under .pytest_cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stacks.config import PROJECT_DIR
from training_project.torch_pins import pinned_version

PROJECTS = Path(__file__).parent / "projects"
TORCH = pinned_version("torch")
CUDA_LIBRARIES = ("libcudart*", "libcublas*")


@pytest.fixture(scope="module")
def environment(uv_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL"))}
    env.update(
        FABRIC_VENVS_DIR=str(tmp_path_factory.mktemp("venvs")),
        UV_CACHE_DIR=str(uv_cache),
        UV_NO_PROGRESS="1",
    )
    return env


def local_cluster(
    env: dict[str, str], project: Path, script: str, run_dir: Path, *script_args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "local.cluster",
            "--project",
            str(project),
            "--script",
            script,
            "--num-nodes",
            "2",
            "--devices-per-node",
            "1",
            "--run-dir",
            str(run_dir),
            "--",
            *script_args,
        ],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )


def venv_packages(output: str) -> tuple[list[str], Path]:
    """The distributions of the venv the run used (its python is in the node command line),
    and its site-packages."""
    line = next(text for text in output.splitlines() if "starting node 0:" in text)
    python = line.split("starting node 0: ", 1)[1].split()[0]
    probe = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m; "
            "print(*sorted(d.metadata['Name'].lower() for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    site_packages = next((Path(python).parent.parent / "lib").glob("python3.*/site-packages"))
    return probe.stdout.split(), site_packages


@pytest.mark.parametrize(
    ("name", "script", "dependency"),
    [
        ("with-requirements", "src/main.py", "tabulate"),
        ("with-lock", "train.py", "humanize"),  # pyproject.toml + uv.lock, torch in the lock
        ("names-torch", "main.py", "tabulate"),  # requirements.txt says torch>=2 and lightning
    ],
)
@pytest.mark.slow
def test_a_project_installs_and_trains_on_two_nodes(
    environment: dict[str, str], tmp_path: Path, name: str, script: str, dependency: str
) -> None:
    project = PROJECTS / name
    result = local_cluster(environment, project, script, tmp_path / "run")
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    assert result.returncode == 0
    assert "[fabric-install] done" in result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dependency"] == dependency
    assert summary["words"] == 9  # data/words.txt, read by a relative path
    # fabric run ran in the project folder as it ships (a staged copy), as on a node.
    staged = Path(summary["cwd"])
    assert staged != project and staged.name == project.name
    assert f"shipped file(s) staged in {staged}" in result.stdout
    assert summary["torch"] == f"{TORCH}+cpu"
    assert summary["final_loss"] < 1.0
    packages, site_packages = venv_packages(result.stdout)
    assert dependency in packages and "boto3" in packages and "click" in packages
    # The install step's promise: the CPU build, even for "torch>=2", and no CUDA at all.
    assert [p for p in packages if p.startswith(("nvidia-", "triton"))] == []
    assert [p for pattern in CUDA_LIBRARIES for p in site_packages.rglob(pattern)] == []

    if name != "with-requirements":
        return  # the cached venv's reuse, once
    again = local_cluster(environment, project, script, tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(cached)" in again.stdout and "[fabric-install]" not in again.stdout + again.stderr
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["world_size"] == 2


def test_a_bad_project_is_one_line_and_starts_nothing(
    environment: dict[str, str], tmp_path: Path
) -> None:
    result = local_cluster(environment, PROJECTS / "with-requirements", "nope.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("[cluster] error: invalid setting script='nope.py'")
    assert result.stderr.count("\n") == 1
    assert "[fabric-install]" not in result.stdout and "starting node" not in result.stdout


@pytest.mark.slow
def test_a_dependency_that_cannot_be_installed_shows_the_installers_message(
    environment: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "broken"
    project.mkdir()
    (project / "main.py").write_text("print('never runs')\n")
    (project / "requirements.txt").write_text("fabric-cluster-no-such-package==1.0\n")
    result = local_cluster(environment, project, "main.py", tmp_path / "run")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("[cluster] error: install: ")
    assert "fabric-cluster-no-such-package was not found in the package registry" in error
    assert "starting node" not in result.stdout
    assert not [v for v in os.listdir(environment["FABRIC_VENVS_DIR"]) if v.startswith("broken")]


@pytest.mark.slow
def test_a_package_whose_script_is_a_module_is_installed_and_runs(
    environment: dict[str, str], tmp_path: Path
) -> None:
    """src layout, [build-system], script "-m trainpkg.train": installed into the venv (not
    editable, so it imports from any folder), started as `python -m` would, on two nodes; what
    it writes beside itself is in the run's outputs/."""
    project = PROJECTS / "package-module"
    run_dir = tmp_path / "run"
    result = local_cluster(environment, project, "-m trainpkg.train", run_dir, "--lr", "0.1")
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    assert result.returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["module"] == "trainpkg.train"
    assert summary["args"] == ["--lr", "0.1"]
    assert "/site-packages/trainpkg" in summary["package"]  # installed, not the source folder
    assert sorted(p.name for p in (run_dir / "outputs" / "lightning_logs").iterdir()) == [
        "rank0.txt",
        "rank1.txt",
    ]
    assert not (project / "build").exists() and not list(project.rglob("*.egg-info"))


def test_two_runs_at_once_install_a_projects_venv_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `make local` (or a test beside a rehearsal) asking for one project's venv at the same
    time: the second waits for the first install and takes its venv, not a half-made one."""
    from local import project_venv
    from training_project.load import load_project

    monkeypatch.setattr(project_venv, "VENVS_DIR", tmp_path / "venvs")
    installs: list[str] = []

    def slow_install(project: object, accelerator: str, source: str, venv: Path) -> None:
        installs.append(venv.name)
        time.sleep(0.5)  # the window in which the other run looks
        venv.mkdir(parents=True)
        (venv / project_venv.DONE_MARKER).write_text("{}\n")

    monkeypatch.setattr(project_venv, "install", slow_install)
    project = load_project(str(PROJECTS / "with-lock"), "train.py", PROJECT_DIR, TORCH)
    with ThreadPoolExecutor(2) as pool:
        venvs = list(pool.map(lambda _: project_venv.project_venv(project, "cpu"), range(2)))
    assert len(installs) == 1 and venvs[0] == venvs[1]
    assert (venvs[0] / project_venv.DONE_MARKER).is_file()

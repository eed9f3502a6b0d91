"""The node's install step: userdata/install.sh run for real (CPU), and boot.sh's call of it;
and where torch comes from for this machine's own .venv (local/torch_source.py, the Makefile).

The real installs are the tests that leave 127.0.0.1: they reach PyPI for uv's wheel (through
boot.sh's own uv phase), lightning and the other node requirements. torch comes from this
machine's CPU wheel when it has one (FABRIC_TORCH_INDEX=/opt/wheels), else from the PyTorch CPU
index as on EC2. uv's downloads are cached under .pytest_cache (uv's cache is made to be shared
between runs): about 1 GB, 50 s cold, 30 s warm on 2 cores.

The torch family's install uses stand-in wheels (tests/wheels.py), since this machine has no CPU
torchvision: a folder as torch's source (this machine's torch wheel and a torchvision
0.28.0+cpu), another as the "PyPI" of the packages that need torchvision. It proves where each
build comes from and what the check refuses, not that a real CPU torchvision imports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local import project_venv
from local.torch_source import CPU_TORCH_INDEX, pip_arguments, torch_source
from stacks.cluster_app import cdk_json_context
from stacks.config import PROJECT_DIR, load_config
from stacks.user_data import UV_VERSION, UV_WHEEL_SHA256, UV_WHEEL_URL, render_boot_script
from tests.wheels import build_wheel
from training_project.torch_pins import NODE_REQUIREMENTS, pinned_version

INSTALL_SCRIPT = PROJECT_DIR / "userdata" / "install.sh"
EXAMPLE_PROJECT = PROJECT_DIR / "trainer"
INSTALLABLE_PROJECT = PROJECT_DIR / "tests" / "projects" / "installable"
TORCH_VERSION = pinned_version("torch")
LOCAL_WHEELS = Path("/opt/wheels")


def rendered_boot_script() -> str:
    config = load_config(cdk_json_context().get)
    return render_boot_script(
        config, region="us-east-1", payload_url="s3://bucket/payload.zip", artifacts_bucket="b"
    )


def install_call(script: str) -> str:
    """boot.sh's command line that runs install.sh, continuation lines joined."""
    match = re.search(r"^[^#\n]*userdata/install\.sh(?:.*\\\n)*.*$", script, re.MULTILINE)
    assert match, "boot.sh does not run userdata/install.sh"
    return match.group(0)


def install_command(uv: Path, venv: Path, project: Path = EXAMPLE_PROJECT) -> list[str]:
    """install.sh for the CPU case, as boot.sh calls it, with this machine's Python."""
    arguments = {
        "--uv": uv,
        "--venv": venv,
        "--python": sys.executable,
        "--accelerator": "cpu",
        "--torch-version": TORCH_VERSION,
        "--project": project,
        "--requirements": NODE_REQUIREMENTS,
        "--error-file": venv.parent / "install-error.txt",
    }
    return [
        "bash",
        str(INSTALL_SCRIPT),
        *(str(part) for item in arguments.items() for part in item),
    ]


def test_boot_script_runs_install_sh_with_every_argument_it_takes() -> None:
    call = install_call(rendered_boot_script())
    passed = set(re.findall(r"(?<!\S)--[a-z][a-z-]*", call))
    accepted = set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", INSTALL_SCRIPT.read_text(), re.M))
    assert passed == accepted
    assert call.lstrip().startswith("bash ")  # a zip extraction keeps no executable bit


def test_boot_script_checks_uv_before_using_it() -> None:
    script = rendered_boot_script()
    assert f"readonly UV_WHEEL_SHA256={UV_WHEEL_SHA256}" in script
    assert f"readonly UV_WHEEL_URL={UV_WHEEL_URL}" in script
    assert "sha256sum --check --strict" in script
    assert script.index("sha256sum --check") < script.index('"$uv" --version')
    assert "astral.sh" not in script
    assert not re.search(r"(^|[|\s])sh\s*$", script, re.MULTILINE)  # no download piped to sh
    wheel = f"uv-{UV_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    assert UV_WHEEL_URL.endswith("/" + wheel)


def test_install_script_passes_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", "-x", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--accelerator", "tpu"], "--accelerator must be cpu or gpu, not 'tpu'"),
        (["--color"], "--color needs a value"),
        (["--color", "red"], "unknown argument --color"),
    ],
)
def test_install_script_refuses_bad_arguments(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    uv = tmp_path / "uv"
    uv.write_text("#!/bin/sh\nexit 99\n")
    uv.chmod(0o755)
    result = subprocess.run(
        [*install_command(uv, tmp_path / "venv"), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "venv").exists()


def boot_uv_phase(script: str, fabric_home: Path) -> str:
    """boot.sh's own uv phase (download, sha256 check, unpack), runnable on its own."""
    settings = re.findall(r"^readonly UV_\w+=.*$", script, re.MULTILINE)
    phase = re.search(r'^  begin uv .*?^  "\$uv" --version$', script, re.MULTILINE | re.DOTALL)
    assert settings and phase, "boot.sh has no uv phase"
    return "\n".join(
        [
            "set -euo pipefail",
            *settings,
            f"FABRIC_HOME={shlex.quote(str(fabric_home))}",
            'begin() { echo "phase $1: $2"; }',
            phase.group(0),
        ]
    )


@pytest.fixture(scope="module")
def uv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uv as a node gets it: boot.sh's uv phase run here (its PyPI wheel, sha256-checked)."""
    fabric_home = tmp_path_factory.mktemp("fabric-home")
    result = subprocess.run(
        ["bash", "-c", boot_uv_phase(rendered_boot_script(), fabric_home)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout  # sha256sum --check
    assert f"uv {UV_VERSION} (x86_64-unknown-linux-gnu" in result.stdout
    return fabric_home / "bin" / "uv"


def local_torch_wheels() -> Path | None:
    """This machine's folder of CPU torch wheels, when it holds the pinned one."""
    if any(LOCAL_WHEELS.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
        return LOCAL_WHEELS
    return None


def install_environment(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "FABRIC_", "VIRTUAL"))}
    env.update(UV_CACHE_DIR=str(cache_dir), UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    wheels = local_torch_wheels()
    if wheels:
        env["FABRIC_TORCH_INDEX"] = str(wheels)
    return env


@pytest.mark.slow
def test_a_dependency_that_cannot_be_installed_fails_with_the_installers_own_message(
    uv: Path, uv_cache: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("fabric-cluster-no-such-package==1.0\n")
    venv = tmp_path / "venv"
    install = subprocess.run(
        install_command(uv, venv, project),
        env=install_environment(uv_cache),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 1
    message = (tmp_path / "install-error.txt").read_text()
    assert message.count("\n") == 1  # one line
    assert message.startswith("install: ")
    assert "fabric-cluster-no-such-package" in message and "not found" in message


def run_install(
    uv: Path, venv: Path, project: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        install_command(uv, venv, project),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
    return result


def venv_facts(venv: Path, cwd: Path) -> dict:
    """What the venv's python sees from another folder than the project's."""
    code = """
import importlib.metadata as m, json, torchvision, mypkg.model
print(json.dumps({
    "torchvision": m.version("torchvision"), "build": torchvision.BUILD,
    "mypkg": mypkg.model.__file__,
    "direct_url": m.distribution("mypkg").read_text("direct_url.json"),
}))
"""
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )
    return json.loads(result.stdout)


@pytest.mark.slow
def test_the_torch_family_comes_from_torchs_source_and_a_package_is_installed(
    uv: Path, uv_cache: Path, tmp_path: Path
) -> None:
    wheels = local_torch_wheels()
    if wheels is None:
        pytest.skip(f"needs this machine's CPU torch {TORCH_VERSION} wheel in {LOCAL_WHEELS}")
    # torch's source: this machine's torch wheel and the CPU torchvision that goes with it.
    source = tmp_path / "torch-source"
    source.mkdir()
    for wheel in wheels.glob(f"torch-{TORCH_VERSION}+cpu-*.whl"):
        (source / wheel.name).symlink_to(wheel)
    build_wheel(source, "torchvision", "0.28.0+cpu", {"torchvision/__init__.py": "BUILD = 'cpu'\n"})
    # The "PyPI" of the dependents: a CUDA torchvision (where PyPI itself has 0.28.0, uv takes
    # that one, its cp311 wheel before a py3-none-any: the CUDA build too), a package that needs
    # torchvision, one that carries a CUDA library.
    pypi = tmp_path / "pypi"
    build_wheel(
        pypi,
        "torchvision",
        "0.28.0",
        {"torchvision/__init__.py": "BUILD = 'cuda'\n", "torchvision.libs/libcudart.so.13": b"\0"},
        requires=[f"torch=={TORCH_VERSION}"],
    )
    build_wheel(pypi, "fabric-test-visiondep", "1.0", {"visiondep.py": ""}, ["torchvision"])
    cuda_files = {
        "fabric_test_cudalib/__init__.py": "",
        "fabric_test_cudalib.libs/libcudart.so.13": b"\0",
    }
    build_wheel(pypi, "fabric-test-cudalib", "1.0", cuda_files)
    env = install_environment(uv_cache)
    env.update(FABRIC_TORCH_INDEX=str(source), UV_FIND_LINKS=str(pypi))
    venv = tmp_path / "venv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # A package (src layout, setuptools) that names torchvision: torchvision comes with torch,
    # from torch's source; the package is installed, not editable.
    package = shutil.copytree(INSTALLABLE_PROJECT, tmp_path / "installable")
    install = run_install(uv, venv, package, env)
    assert install.returncode == 0
    assert f"torch: torch=={TORCH_VERSION}+cpu torchvision==0.28.0+cpu from {source}" in (
        install.stdout
    )
    facts = venv_facts(venv, elsewhere)
    assert (facts["torchvision"], facts["build"]) == ("0.28.0+cpu", "cpu")
    assert Path(facts["mypkg"]).is_relative_to(venv)  # installed, not the project's src/
    assert "editable" not in json.loads(facts["direct_url"]).get("dir_info", {})
    site = next(venv.glob("lib/python*/site-packages"))
    assert not [p.name for p in site.glob("*.pth") if "mypkg" in p.read_text() + p.name]
    script = subprocess.run(
        [str(venv / "bin" / "python"), str(package / "train.py")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    assert "torch.Size([1, 2])" in script.stdout

    # The same venv (boot.sh makes it first) for a project that only gets torchvision with
    # another package: PyPI's build comes in, torch's source's replaces it.
    subprocess.run(
        [str(uv), "pip", "uninstall", "--python", str(venv / "bin" / "python"), "torchvision"],
        env=env,
        check=True,
    )
    dependent = tmp_path / "dependent"
    dependent.mkdir()
    (dependent / "train.py").write_text("import visiondep\n")
    (dependent / "requirements.txt").write_text("fabric-test-visiondep==1.0\n")
    install = run_install(uv, venv, dependent, env)
    assert install.returncode == 0
    assert "+ torchvision==0.28.0\n" in install.stderr  # from PyPI (or the stand-in "PyPI")
    assert f"torch family: torchvision==0.28.0+cpu from {source}, for the build" in install.stdout
    facts = venv_facts(venv, elsewhere)
    assert (facts["torchvision"], facts["build"]) == ("0.28.0+cpu", "cpu")

    # A CUDA library in a CPU venv, whatever the package: the check names it and the file.
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    (cuda / "train.py").write_text("")
    (cuda / "requirements.txt").write_text("fabric-test-cudalib==1.0\n")
    install = run_install(uv, venv, cuda, env)
    assert install.returncode == 1
    message = (tmp_path / "install-error.txt").read_text()
    assert message == (
        "check: CUDA in a CPU venv: fabric-test-cudalib 1.0 "
        "(fabric_test_cudalib.libs/libcudart.so.13)\n"
    )


def pip_environment(tmp_path: Path, config: str | None, **extra: str) -> dict[str, str]:
    """A clean environment whose pip configuration is `config` (None: no pip config at all)."""
    path = Path(os.devnull)
    if config is not None:
        path = tmp_path / "pip.conf"
        path.write_text(config)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": str(path),
        **extra,
    }


def test_torch_comes_from_fabric_torch_index_else_pips_find_links_else_the_cpu_index(
    tmp_path: Path,
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    assert pip_arguments(pip_environment(tmp_path, None)) == ["--index-url", CPU_TORCH_INDEX]
    assert torch_source(pip_environment(tmp_path, None)) == ""  # install.sh's default
    missing = f"[global]\nfind-links = {tmp_path / 'missing'}\n"
    assert pip_arguments(pip_environment(tmp_path, missing))[0] == "--index-url"
    configured = pip_environment(tmp_path, f"[global]\nfind-links = {wheels}\n")
    assert pip_arguments(configured) == ["--find-links", str(wheels)]
    assert torch_source(configured) == str(wheels)
    from_env = pip_environment(tmp_path, None, PIP_FIND_LINKS=f"file://{wheels}")
    assert pip_arguments(from_env) == ["--find-links", str(wheels)]
    index = "https://download.pytorch.org/whl/cu130"
    with_index = pip_environment(tmp_path, f"[global]\nfind-links = {wheels}\n")
    with_index["FABRIC_TORCH_INDEX"] = index
    assert pip_arguments(with_index) == ["--index-url", index]
    folder = pip_environment(tmp_path, None, FABRIC_TORCH_INDEX=str(wheels))
    assert pip_arguments(folder) == ["--find-links", str(wheels)]
    assert project_venv.torch_source is torch_source  # one definition


def test_the_makefile_installs_torch_from_its_source_before_the_requirements() -> None:
    result = subprocess.run(
        ["make", "--dry-run", "--always-make", ".venv/.runtime"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = result.stdout.splitlines()
    torch = [i for i, line in enumerate(commands) if "-m local.torch_source" in line]
    requirements = [i for i, line in enumerate(commands) if "-r requirements.txt" in line]
    assert torch and requirements and torch[0] < requirements[0]
    assert commands[torch[0]].endswith(f'"torch=={TORCH_VERSION}"')
    assert "pip install" in commands[torch[0]]
    printed = subprocess.run(
        [sys.executable, "-m", "local.torch_source"],
        cwd=PROJECT_DIR,
        env={"PATH": os.environ["PATH"], "PIP_CONFIG_FILE": os.devnull},
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout == f"--index-url {CPU_TORCH_INDEX}\n"

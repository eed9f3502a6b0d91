"""The user's project: its dependency forms, the torch rule, what ships, and bad input as one
line naming the setting (at synth; the local cluster runs the same checks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stacks.config import ConfigError, load_config
from stacks.payload import PAYLOAD_AGENT, PAYLOAD_PROJECT
from stacks.project import (
    MAX_PROJECT_BYTES,
    check_size,
    node_torch_version,
    pinned_version,
    shipped_files,
    torch_specifiers,
)
from tests.cfn import Synth, cdk_json_context, user_data_text
from userdata.dependencies import DependencyError, node_requirements

PROJECTS = Path(__file__).parent / "projects"
EXAMPLE = Path(__file__).parent.parent / "examples" / "charlm"
AGENT_REQUIREMENTS = Path(__file__).parent.parent / "userdata" / "requirements-node.txt"
PINNED_TORCH = pinned_version("torch")
UV = shutil.which("uv") or str(Path(__import__("sys").executable).parent / "uv")


def load(**overrides: Any):
    return load_config(cdk_json_context(**overrides).get)


def names(lines: list[str]) -> list[str]:
    return [line.split("==")[0].split(">")[0].split(" ")[0] for line in lines]


def test_requirements_txt_is_installed_as_it_is_with_the_agents_needs() -> None:
    project = PROJECTS / "with-requirements"
    lines = node_requirements(project, AGENT_REQUIREMENTS, UV)
    assert lines == ["tabulate==0.9.0", "lightning==2.6.6", "click==8.5.1", "boto3==1.44.8"]


def test_a_project_naming_lightning_itself_gets_its_own_and_never_its_torch() -> None:
    lines = node_requirements(PROJECTS / "names-torch", AGENT_REQUIREMENTS, UV)
    assert lines == ["lightning", "tabulate==0.9.0", "click==8.5.1", "boto3==1.44.8"]


def test_includes_are_followed_once_and_a_tool_only_pyproject_is_not_a_dependency_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 100\n")
    (tmp_path / "requirements.txt").write_text("-r base.txt\n--requirement=extra.txt\n")
    (tmp_path / "base.txt").write_text("torch==2.5.1+cu121\n-rrequirements.txt\nhumanize\n")
    (tmp_path / "extra.txt").write_text("lightning==2.5.0  # pinned by the project\n")
    lines = node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)
    assert lines == ["humanize", "lightning==2.5.0  # pinned by the project", "click==8.5.1",
                     "boto3==1.44.8"]  # fmt: skip


def test_uv_lock_is_installed_as_locked_without_torch_or_its_cuda_wheels() -> None:
    lines = node_requirements(EXAMPLE, AGENT_REQUIREMENTS, UV)
    locked = [line for line in lines if "==" in line and ";" not in line]
    assert "lightning==2.6.6" in locked and "click==8.5.1" in lines
    assert not [n for n in names(lines) if n == "torch" or n.startswith(("nvidia-", "triton"))]
    # The lock, not PyPI's newest: every line is pinned.
    assert all("==" in line for line in lines)


def test_pyproject_dependencies_without_a_lock(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "1"\n'
        'dependencies = ["tabulate>=0.9", "Lightning==2.6.6"]\n'
    )
    lines = node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)
    assert lines == ["tabulate>=0.9", "Lightning==2.6.6", "click==8.5.1", "boto3==1.44.8"]


def test_a_project_with_no_dependency_file_gets_what_fabric_run_needs(tmp_path: Path) -> None:
    assert node_requirements(tmp_path, AGENT_REQUIREMENTS, UV) == [
        "lightning==2.6.6",
        "click==8.5.1",
        "boto3==1.44.8",
    ]


@pytest.mark.parametrize(
    ("specifiers", "expected"),
    [
        ([], PINNED_TORCH),
        ([">=2"], PINNED_TORCH),
        ([">=2.3,<3"], PINNED_TORCH),
        (["==2.5.1"], "2.5.1"),
        (["==2.5.1+cu121"], "2.5.1"),  # the local label is the node's choice
        (["===2.4.0"], "2.4.0"),
    ],
)
def test_the_torch_a_node_installs(specifiers: list[str], expected: str) -> None:
    assert node_torch_version(specifiers, PINNED_TORCH) == expected


def test_a_torch_range_the_pinned_build_does_not_satisfy_is_an_error() -> None:
    with pytest.raises(DependencyError, match=rf"torch<2.*nodes' torch {PINNED_TORCH}"):
        node_torch_version(["<2"], PINNED_TORCH)


def test_torch_in_each_dependency_form(tmp_path: Path) -> None:
    assert torch_specifiers(EXAMPLE) == [f"=={PINNED_TORCH}"]  # the lock's version
    assert torch_specifiers(PROJECTS / "names-torch") == [">=2"]
    assert torch_specifiers(PROJECTS / "with-requirements") == []
    (tmp_path / "requirements.txt").write_text("-r base.txt\n")
    (tmp_path / "base.txt").write_text("torch==2.5.1  # pinned\n")
    assert torch_specifiers(tmp_path) == ["==2.5.1"]


def test_what_ships_and_what_never_does(tmp_path: Path) -> None:
    files = {
        "train.py": "",
        "pkg/model.py": "",
        "pkg/runs/keep.py": "",  # runs/ is left out only at the top
        "runs/local/step-1.ckpt": "",
        ".git/HEAD": "",
        "__pycache__/train.cpython-311.pyc": "",
        "pkg/helper.pyc": "",
        "node_modules/x/index.js": "",
        "myenv/pyvenv.cfg": "",  # a virtualenv, whatever its name
        "myenv/lib/site.py": "",
        ".gitignore": "*.log\ndata/raw/\n!keep.log\nuv.lock\n",
        "debug.log": "",
        "keep.log": "",
        "data/raw/big.bin": "",
        "data/small.txt": "",
        "pkg/.gitignore": "generated/\n",
        "pkg/generated/out.py": "",
        "uv.lock": "version = 1\n",  # the node installs from it: it ships even if ignored
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    shipped = sorted(path.as_posix() for path in shipped_files(tmp_path))
    assert shipped == [
        ".gitignore",
        "data/small.txt",
        "keep.log",
        "pkg/.gitignore",
        "pkg/model.py",
        "pkg/runs/keep.py",
        "train.py",
        "uv.lock",
    ]


def test_a_project_over_the_size_limit_names_what_is_big(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("print()\n")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(ConfigError) as error:
        check_size(tmp_path, shipped_files(tmp_path), limit=2000)
    message = str(error.value)
    assert message.startswith("invalid setting project=") and "\n" not in message
    assert "weights.bin" in message and "--data s3://" in message
    assert MAX_PROJECT_BYTES == 500 * 1024 * 1024


def bad_project(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "script", "message"),
    [
        ({"README.md": "no code"}, "train.py", "holds no Python file"),
        ({"train.py": ""}, "missing.py", "invalid setting script='missing.py'"),
        ({"train.py": ""}, "../outside.py", "invalid setting script='../outside.py'"),
        (
            {"train.py": "", "pyproject.toml": "[project\nname="},
            "train.py",
            "pyproject.toml cannot be read",
        ),
        ({"train.py": "", "uv.lock": b"\xff\xfe not toml"}, "train.py", "uv.lock cannot be read"),
        (
            {"train.py": "", "requirements.txt": "torch<2\n"},
            "train.py",
            f"torch<2, which the nodes' torch {PINNED_TORCH} does not satisfy",
        ),
        (
            {"train.py": "", "requirements.txt": "torch @ https://example.com/torch.whl\n"},
            "train.py",
            "torch from a URL cannot be used",
        ),
        ({"train.py": "", "b.py": "", ".gitignore": "train.py\n"}, "train.py", "would not ship"),
    ],
)
def test_a_bad_project_is_one_line_naming_the_setting(
    tmp_path: Path, files: dict[str, str | bytes], script: str, message: str
) -> None:
    (tmp_path / "outside.py").write_text("")
    project = bad_project(tmp_path / "project", files)
    with pytest.raises(ConfigError) as error:
        load(project=str(project), script=script)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert text.startswith(("invalid setting project=", "invalid setting script="))


def test_a_missing_project_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid setting project='nope': no such folder"):
        load(project="nope")
    with pytest.raises(ConfigError, match=r"no such folder"):
        load(project=str(tmp_path / "gone"))


def test_a_relative_project_is_relative_to_the_app() -> None:
    config = load(project="examples/charlm", script="train.py")
    assert config.project == EXAMPLE.resolve() and config.script == "train.py"
    assert config.torch_version == PINNED_TORCH


@pytest.fixture(scope="module")
def project_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Synth, Path]:
    """One synth of a project beside files that never ship."""
    project = tmp_path_factory.mktemp("project") / "my-model"
    shutil.copytree(PROJECTS / "with-requirements", project)
    for junk in ("runs/local/step-1.ckpt", "debug.log", ".venv/pyvenv.cfg", ".git/HEAD"):
        (project / junk).parent.mkdir(parents=True, exist_ok=True)
        (project / junk).write_text("never shipped\n")
    synth = Synth(
        tmp_path_factory.mktemp("out"),
        project=str(project),
        script="src/main.py",
        script_args="--epochs 2",
    )
    return synth, project


def test_synth_ships_the_project_and_the_agent_and_nothing_else(
    project_synth: tuple[Synth, Path],
) -> None:
    synth, _ = project_synth
    assets = json.loads((synth.outdir / f"{synth.stack.artifact_id}.assets.json").read_text())
    zips = [a for a in assets["files"].values() if a["source"]["packaging"] == "zip"]
    assert len(zips) == 1
    folder = synth.outdir / zips[0]["source"]["path"]
    assert sorted(p.name for p in folder.iterdir()) == [PAYLOAD_PROJECT, PAYLOAD_AGENT]
    project = folder / PAYLOAD_PROJECT
    shipped = sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file())
    assert shipped == [
        ".gitignore",
        "data/words.txt",
        "requirements.txt",
        "src/main.py",
        "src/words.py",
    ]
    agent = sorted(p.name for p in (folder / PAYLOAD_AGENT).iterdir())
    assert "agent.py" in agent and "install.sh" in agent and "dependencies.py" in agent
    assert not [name for name in agent if name.endswith(".pyc") or name == "__pycache__"]


def test_synth_runs_the_script_in_the_project_folder(project_synth: tuple[Synth, Path]) -> None:
    synth, _ = project_synth
    user_data = user_data_text(synth.launch_template())
    assert "readonly SCRIPT=src/main.py" in user_data
    assert "PROJECT=$PAYLOAD_DIR/project" in user_data
    assert '--workdir "$PROJECT"' in user_data and '--project "$PROJECT"' in user_data
    assert "readonly TORCH_VERSION=" + PINNED_TORCH in user_data

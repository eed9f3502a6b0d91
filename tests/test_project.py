"""The user's project: its dependency forms, the torch rule, what ships, and bad input as one
line naming the setting (at synth; the local cluster runs the same checks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stacks.config import ConfigError, load_config
from stacks.payload import PAYLOAD_AGENT, PAYLOAD_PROJECT, PAYLOAD_TRAINING_PROJECT
from tests.cfn import Synth, cdk_json_context, user_data_text
from training_project.dependencies import installable, main, node_requirements
from training_project.errors import DependencyError, ProjectError
from training_project.load import load_project, project_script
from training_project.shipping import MAX_PROJECT_BYTES, check_size, shipped_files
from training_project.torch_family import family_versions
from training_project.torch_pins import node_torch_version, pinned_version, torch_specifiers
from userdata.run_inputs import INPUTS_FILE

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


@pytest.mark.parametrize(
    ("torch", "versions"),
    [
        ("2.13.0", {"torchvision": "0.28.0", "torchaudio": "2.13.0"}),
        ("2.13.0+cpu", {"torchvision": "0.28.0", "torchaudio": "2.13.0"}),
        ("2.5.1", {"torchvision": "0.20.1", "torchaudio": "2.5.1"}),
        ("2.0.1", {"torchvision": "0.15.2", "torchaudio": "2.0.2"}),  # not the rule's
        ("1.13.1", {}),
        ("2.14.0rc1", {}),
    ],
)
def test_the_torch_familys_versions_that_go_with_a_torch(
    torch: str, versions: dict[str, str]
) -> None:
    assert family_versions(torch) == versions


def test_the_torch_family_is_never_in_the_projects_lines_and_install_sh_learns_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "requirements.txt").write_text(
        "TorchVision>=0.20\ntimm==1.0.20\ntorchaudio\ntorch==2.13.0\n"
    )
    pins, named = tmp_path / "pins.txt", tmp_path / "named.txt"
    lines = node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)
    assert lines == ["timm==1.0.20", "lightning==2.6.6", "click==8.5.1", "boto3==1.44.8"]
    arguments = ["--project", str(tmp_path), "--agent-requirements", str(AGENT_REQUIREMENTS)]
    family = ["--torch-version", "2.13.0", "--family-pins", str(pins), "--family-named", str(named)]
    assert main([*arguments, "--uv", UV, *family]) == 0
    assert pins.read_text() == "torchvision==0.28.0\ntorchaudio==2.13.0\n"
    assert named.read_text() == "torchvision==0.28.0\ntorchaudio==2.13.0\n"
    (tmp_path / "requirements.txt").write_text("timm==1.0.20\n")  # torchvision only comes with it
    assert main([*arguments, "--uv", UV, *family]) == 0
    assert named.read_text() == ""
    assert pins.read_text() == "torchvision==0.28.0\ntorchaudio==2.13.0\n"


LOCKED_TORCHVISION = """version = 1
revision = 3
requires-python = ">=3.11"

[[package]]
name = "x"
version = "0.1.0"
source = { virtual = "." }
dependencies = [{ name = "torchvision" }, { name = "tabulate" }]

[package.metadata]
requires-dist = [{ name = "torchvision" }, { name = "tabulate" }]

[[package]]
name = "torchvision"
version = "0.28.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "tabulate"
version = "0.9.0"
source = { registry = "https://pypi.org/simple" }
"""


def test_a_torch_family_member_in_the_lock_comes_with_torch_not_with_the_lock(
    tmp_path: Path,
) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "0.1.0"\ndependencies = ["torchvision", "tabulate"]\n'
    )
    (tmp_path / "uv.lock").write_text(LOCKED_TORCHVISION)
    assert node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)[0] == "tabulate==0.9.0"
    named = tmp_path / "named.txt"
    arguments = ["--project", str(tmp_path), "--agent-requirements", str(AGENT_REQUIREMENTS)]
    family = ["--torch-version", "2.13.0", "--family-pins", str(tmp_path / "pins.txt")]
    assert main([*arguments, "--uv", UV, *family, "--family-named", str(named)]) == 0
    assert named.read_text() == "torchvision==0.28.0\n"
    # A uv project that is a package: the lock's requirements, then the project itself.
    with (tmp_path / "pyproject.toml").open("a") as pyproject:
        pyproject.write("[tool.uv]\npackage = true\n")
    lock = LOCKED_TORCHVISION.replace('source = { virtual = "." }', 'source = { editable = "." }')
    (tmp_path / "uv.lock").write_text(lock)
    assert node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)[:2] == ["tabulate==0.9.0", "."]


@pytest.mark.parametrize(
    ("requirement", "torch"),
    [
        ("torchvision", PINNED_TORCH),
        ("torchvision>=0.20", PINNED_TORCH),
        ("torchvision==0.28.0", "2.13.0"),
        ("torchvision==0.28.0+cu130", "2.13.0"),  # the label is the node's choice
        ("torchaudio~=2.13.0", "2.13.0"),
        ("torch==2.5.1\ntorchvision==0.20.1", "2.5.1"),  # the family of the project's torch
    ],
)
def test_a_torch_family_pin_that_goes_with_the_nodes_torch_is_fine(
    tmp_path: Path, requirement: str, torch: str
) -> None:
    (tmp_path / "train.py").write_text("")
    (tmp_path / "requirements.txt").write_text(requirement + "\n")
    assert load_project(str(tmp_path), "train.py", tmp_path, PINNED_TORCH).torch_version == torch


def test_an_installable_project_is_installed_itself_and_a_folder_of_scripts_is_not(
    tmp_path: Path,
) -> None:
    package = PROJECTS / "installable"
    assert installable(package)
    assert node_requirements(package, AGENT_REQUIREMENTS, UV) == [
        ".",  # install.sh installs from the project folder: not editable
        "lightning==2.6.6",
        "click==8.5.1",
        "boto3==1.44.8",
    ]
    for folder in ("with-lock", "with-requirements", "names-torch"):
        assert not installable(PROJECTS / folder)
        assert "." not in node_requirements(PROJECTS / folder, AGENT_REQUIREMENTS, UV)
    assert not installable(EXAMPLE)  # a uv project with package = false
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\nversion = "1"\n[tool.uv]\npackage = true\n')
    assert installable(tmp_path)
    assert node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)[0] == "."
    pyproject.write_text('[build-system]\nrequires = ["hatchling"]\n[tool.uv]\npackage = false\n')
    assert not installable(tmp_path)  # uv's rule: package = false wins
    (tmp_path / "requirements.txt").write_text("-e .\n")
    pyproject.write_text('[build-system]\nrequires = ["setuptools"]\n')
    assert node_requirements(tmp_path, AGENT_REQUIREMENTS, UV)[0] == "-e ."  # as it asks, once


def test_the_local_venv_of_a_package_is_built_from_what_ships_and_keyed_by_it(
    tmp_path: Path,
) -> None:
    from local.project_venv import stage_shipped, venv_key

    package = shutil.copytree(PROJECTS / "installable", tmp_path / "installable")
    (package / ".gitignore").write_text("*.log\n")
    (package / "debug.log").write_text("never ships\n")
    project = load_project(str(package), "train.py", tmp_path, PINNED_TORCH)
    key = venv_key(project, "cpu", "")
    (package / "debug.log").write_text("changed, and still never ships\n")
    assert venv_key(project, "cpu", "") == key
    (package / "src" / "mypkg" / "model.py").write_text("class Net: ...\n")
    assert venv_key(project, "cpu", "") != key  # the venv holds the package: a new one
    staged = stage_shipped(package, tmp_path / "staged")
    copied = sorted(p.relative_to(staged) for p in staged.rglob("*") if p.is_file())
    assert copied == shipped_files(package) and Path("debug.log") not in copied
    scripts = shutil.copytree(PROJECTS / "with-requirements", tmp_path / "scripts")
    project = load_project(str(scripts), "src/main.py", tmp_path, PINNED_TORCH)
    key = venv_key(project, "cpu", "")
    (scripts / "src" / "main.py").write_text("print('changed')\n")
    assert venv_key(project, "cpu", "") == key  # run where it lies: the venv stays


def module_project(root: Path) -> Path:
    for name in ("train.py", "pkg/__init__.py", "pkg/train.py", "tool/__main__.py",
                 "src/mypkg/__init__.py", "src/mypkg/cli/__main__.py", "src/mypkg/fit.py",
                 "pkg/skipped.py", ".gitignore"):  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("pkg/skipped.py\n" if name == ".gitignore" else "")
    return root


@pytest.mark.parametrize(
    ("value", "script"),
    [
        ("train.py", "train.py"),
        ("-m pkg.train", "-m pkg.train"),
        ("  -m   pkg.train ", "-m pkg.train"),
        ("-mpkg.train", "-m pkg.train"),
        ("-m tool", "-m tool"),  # tool/__main__.py
        ("-m mypkg.fit", "-m mypkg.fit"),  # src layout
        ("-m mypkg.cli", "-m mypkg.cli"),  # src/mypkg/cli/__main__.py
        ("-m train", "-m train"),
    ],
)
def test_a_script_is_a_file_or_a_module_of_the_project(
    tmp_path: Path, value: str, script: str
) -> None:
    assert project_script(value, module_project(tmp_path)) == script


@pytest.mark.parametrize(
    "value",
    ["-m pkg.missing", "-m pkg.skipped", "-m pkg/train", "-m", "-m pkg.train extra", "--m x",
     "-m ..pkg", "-m 1pkg"],
)  # fmt: skip
def test_a_bad_module_script_is_one_line_naming_the_setting(tmp_path: Path, value: str) -> None:
    project = module_project(tmp_path / "project")
    with pytest.raises(ConfigError) as error:
        load(project=str(project), script=value)
    text = str(error.value)
    assert text.startswith(f"invalid setting script={value!r}: ") and "\n" not in text
    assert "-m followed by a module shipped in it (pkg/module.py or pkg/module/__main__.py" in text


def test_a_module_script_reaches_the_config() -> None:
    config = load(project=str(PROJECTS / "installable"), script="-m mypkg.model")
    assert config.script == "-m mypkg.model"


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
    with pytest.raises(ProjectError) as error:
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
        (
            {"train.py": "", "requirements.txt": "torchvision==0.27.0\n"},
            "train.py",
            f"it pins torchvision==0.27.0, but the nodes' torch {PINNED_TORCH} goes with "
            "torchvision 0.28.0: pin that version or leave it out",
        ),
        (
            {"train.py": "", "requirements.txt": "torchaudio<2.10\n"},
            "train.py",
            "it asks for torchaudio<2.10, but the nodes' torch 2.13.0 goes with torchaudio "
            "2.13.0: allow that version or leave it out",
        ),
        (
            {"train.py": "", "requirements.txt": "torch==2.5.1\ntorchvision==0.28.0\n"},
            "train.py",
            "it pins torchvision==0.28.0, but the nodes' torch 2.5.1 goes with torchvision 0.20.1",
        ),
        (
            {"train.py": "", "requirements.txt": "torch==1.13.1\ntorchvision==0.14.1\n"},
            "train.py",
            "it names torchvision, but no torchvision is known to go with the nodes' torch 1.13.1",
        ),
        (
            {"train.py": "", "requirements.txt": "torchvision @ https://example.com/tv.whl\n"},
            "train.py",
            "torchvision from a URL cannot be used",
        ),
        (
            {
                "train.py": "",
                "uv.lock": 'version = 1\n[[package]]\nname = "torchvision"\nversion = "0.27.0"\n',
            },
            "train.py",
            f"it pins torchvision==0.27.0, but the nodes' torch {PINNED_TORCH} goes with "
            "torchvision 0.28.0",
        ),
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
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [PAYLOAD_PROJECT, PAYLOAD_AGENT, PAYLOAD_TRAINING_PROJECT, INPUTS_FILE]
    )
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
    assert "agent.py" in agent and "install.sh" in agent
    code = sorted(p.name for p in (folder / PAYLOAD_TRAINING_PROJECT).iterdir())
    assert "dependencies.py" in code and "torch_family.py" in code and "errors.py" in code
    for names in (agent, code):
        assert not [name for name in names if name.endswith(".pyc") or name == "__pycache__"]


def test_synth_runs_the_script_in_the_project_folder(project_synth: tuple[Synth, Path]) -> None:
    synth, _ = project_synth
    user_data = user_data_text(synth.launch_template())
    assert "readonly SCRIPT=src/main.py" in user_data
    assert "PROJECT=$PAYLOAD_DIR/project" in user_data
    assert '--workdir "$PROJECT"' in user_data and '--project "$PROJECT"' in user_data
    assert "readonly TORCH_VERSION=" + PINNED_TORCH in user_data

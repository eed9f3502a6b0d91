#!/bin/bash
# The install step of a project: a venv with torch (the accelerator's build), the project's
# dependencies and the node agent's. boot.sh runs it on every node; the local cluster runs the
# same script for `--project`, and tests/test_install.py runs it here.
#
#   install.sh --uv PATH --venv DIR --python VERSION|PATH --accelerator cpu|gpu \
#              --torch-version 2.13.0 --project DIR --requirements FILE --error-file FILE
#
# 1. venv: `uv venv` unless DIR already holds one (boot.sh makes it first, for boto3).
# 2. torch alone, from the accelerator's source: cpu asks for exactly VERSION+cpu, which only
#    the PyTorch CPU index (or a local CPU wheel) has, so no CUDA build or nvidia-* wheel can
#    come in; gpu asks for VERSION from PyPI, whose Linux wheels are the CUDA build.
# 3. the project's dependencies (uv.lock exported as locked, less torch and what only torch
#    needs; else pyproject.toml's; else requirements.txt) and the agent's (--requirements, for
#    what the project does not name), from PyPI, with the installed torch as a constraint:
#    uv keeps the torch of step 2 (nothing can swap it), and fails rather than change it.
# 4. a check that torch is still the build of step 2, and that a CPU venv has no nvidia-*.
# A step that fails writes the installer's own message, on one line, to --error-file.
#
# FABRIC_COMPILE_BYTECODE=1 (the local cluster's cached venvs): the last step compiles the whole
# venv's bytecode, once, so that no node process pays for it at every start.
# FABRIC_TORCH_INDEX (unset on EC2): where torch comes from instead of the default, either an
# index URL (PEP 503, e.g. https://download.pytorch.org/whl/cu130) or a local folder of
# wheels (--find-links), e.g. /opt/wheels for a test on a machine without the PyTorch index.
set -euo pipefail

readonly CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

log() { printf '%s [fabric-install] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*"; }
error_file=''
record() {
  [[ -z $error_file ]] || printf '%s\n' "$1" >"$error_file"
}
die() {
  log "error: $*" >&2
  record "$*"
  exit 2
}

uv='' venv='' python='' accelerator='' torch_version='' project='' requirements=''
while (($#)); do
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case $1 in
    --uv) uv=$2 ;;
    --venv) venv=$2 ;;
    --python) python=$2 ;;
    --accelerator) accelerator=$2 ;;
    --torch-version) torch_version=$2 ;;
    --project) project=$2 ;;
    --requirements) requirements=$2 ;;
    --error-file) error_file=$2 ;;
    *) die "unknown argument $1" ;;
  esac
  shift 2
done
for name in uv venv python accelerator torch_version project requirements; do
  [[ -n ${!name} ]] || die "--${name//_/-} is required"
done
[[ -x $uv ]] || die "--uv $uv is not an executable"
[[ -d $project ]] || die "--project $project is not a folder"
[[ -f $requirements ]] || die "--requirements $requirements is not a file"
# Absolute: the install runs from the project folder.
uv=$(realpath "$uv") venv=$(realpath -m "$venv") requirements=$(realpath "$requirements")
# The folder that holds userdata/ (the payload on a node, the repository here).
agent_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs a step with its stderr kept: on failure, the installer's own message becomes the one
# line of --error-file (uv draws its errors with box characters, taken out here).
step() {
  local what=$1
  shift
  if "$@" 2>"$work/stderr"; then
    cat "$work/stderr" >&2
    return 0
  fi
  cat "$work/stderr" >&2
  local message
  message=$({ grep -Ev '^(Using|Resolved|Prepared|Installed|Uninstalled|Audited) ' "$work/stderr" || true; } |
    tr -s '[:space:]' ' ' | sed -e 's/×//g; s/╰─▶//g; s/│//g' -e 's/  */ /g; s/^ //; s/ $//' |
    cut -c1-900)
  log "error: $what: ${message:-no message}" >&2
  record "$what: ${message:-no message}"
  exit 1
}

torch_source=()
case $accelerator in
  cpu)
    torch_spec="torch==$torch_version+cpu"
    torch_index=${FABRIC_TORCH_INDEX:-$CPU_TORCH_INDEX}
    ;;
  gpu)
    torch_spec="torch==$torch_version"
    torch_index=${FABRIC_TORCH_INDEX:-}
    ;;
  *) die "--accelerator must be cpu or gpu, not '$accelerator'" ;;
esac
if [[ -d $torch_index ]]; then
  torch_source=(--find-links "$torch_index")
elif [[ -n $torch_index ]]; then
  torch_source=(--index-url "$torch_index")
fi

# --no-config: no uv.toml or pyproject.toml of the working directory changes what a node gets.
pip_install=("$uv" pip install --no-config --python "$venv/bin/python")

if [[ -x $venv/bin/python ]]; then
  log "venv: using $venv"
else
  log "venv: creating $venv (Python $python)"
  step venv "$uv" venv --no-config --python "$python" "$venv"
fi

log "torch: $torch_spec from ${torch_index:-PyPI}"
step torch "${pip_install[@]}" "${torch_source[@]}" "$torch_spec"
torch_installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')

log "requirements: the project's ($project) and the agent's ($requirements)"
step dependencies env PYTHONPATH="$agent_root" "$venv/bin/python" -m userdata.dependencies \
  --project "$project" --agent-requirements "$requirements" --uv "$uv" >"$work/requirements.txt"
sed 's/^/  /' "$work/requirements.txt"
log "installing them, torch held at $torch_installed"
echo "torch==$torch_installed" >"$work/constraints.txt"
# From the project folder: a requirements.txt's relative paths (-r, -e) are the project's.
compile=()
[[ ${FABRIC_COMPILE_BYTECODE:-} == 1 ]] && compile=(--compile-bytecode)
(cd "$project" && step install "${pip_install[@]}" "${compile[@]}" \
  --constraints "$work/constraints.txt" -r "$work/requirements.txt")

summary=$(step check "$venv/bin/python" - "$accelerator" "$torch_installed" <<'PY'
import importlib.metadata as metadata
import sys

accelerator, expected = sys.argv[1:]
torch = metadata.version("torch")
if torch != expected:
    sys.exit(f"torch changed from {expected} to {torch} while installing the requirements")
names = sorted({dist.metadata["Name"].lower() for dist in metadata.distributions()})
cuda = [name for name in names if name.startswith("nvidia-")]
if accelerator == "cpu" and cuda:
    sys.exit(f"CUDA packages in a CPU venv: {', '.join(cuda)}")
print(f"torch {torch}, {len(names)} distributions, {len(cuda)} nvidia-*")
PY
)
log "done: $venv ($summary)"

#!/bin/bash
# The node's install step: a venv with torch (the accelerator's build) and the node
# requirements. boot.sh runs it on every node; tests/test_install.py runs the same script here.
#
#   install.sh --uv PATH --venv DIR --python VERSION|PATH --accelerator cpu|gpu \
#              --torch-version 2.13.0 --requirements FILE
#
# 1. venv: `uv venv` unless DIR already holds one (boot.sh makes it first, for boto3).
# 2. torch alone, from the accelerator's source: cpu asks for exactly VERSION+cpu, which only
#    the PyTorch CPU index (or a local CPU wheel) has, so no CUDA build or nvidia-* wheel can
#    come in; gpu asks for VERSION from PyPI, whose Linux wheels are the CUDA build.
# 3. the requirements from PyPI, with the installed torch as a constraint: uv keeps the torch
#    of step 2 (lightning cannot swap it), and fails rather than change it.
# 4. a check that torch is still the build of step 2, and that a CPU venv has no nvidia-*.
#
# FABRIC_TORCH_INDEX (unset on EC2): where torch comes from instead of the default, either an
# index URL (PEP 503, e.g. https://download.pytorch.org/whl/cu130) or a local folder of
# wheels (--find-links), e.g. /opt/wheels for a test on a machine without the PyTorch index.
set -euo pipefail

readonly CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

log() { printf '%s [fabric-install] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*"; }
die() {
  log "error: $*" >&2
  exit 2
}

uv='' venv='' python='' accelerator='' torch_version='' requirements=''
while (($#)); do
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case $1 in
    --uv) uv=$2 ;;
    --venv) venv=$2 ;;
    --python) python=$2 ;;
    --accelerator) accelerator=$2 ;;
    --torch-version) torch_version=$2 ;;
    --requirements) requirements=$2 ;;
    *) die "unknown argument $1" ;;
  esac
  shift 2
done
for name in uv venv python accelerator torch_version requirements; do
  [[ -n ${!name} ]] || die "--${name//_/-} is required"
done
[[ -x $uv ]] || die "--uv $uv is not an executable"
[[ -f $requirements ]] || die "--requirements $requirements is not a file"

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
  "$uv" venv --no-config --python "$python" "$venv"
fi

log "torch: $torch_spec from ${torch_index:-PyPI}"
"${pip_install[@]}" "${torch_source[@]}" "$torch_spec"
torch_installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')

log "requirements: $requirements, torch held at $torch_installed"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_installed" >"$constraints"
"${pip_install[@]}" --constraints "$constraints" -r "$requirements"

summary=$("$venv/bin/python" - "$accelerator" "$torch_installed" <<'PY'
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

#!/bin/bash
# The install step of a project: a venv with torch (the accelerator's build), the project's
# dependencies and the node agent's. boot.sh runs it on every node; the local cluster runs the
# same script for `--project`, and tests/test_install.py runs it here.
#
#   install.sh --uv PATH --venv DIR --python VERSION|PATH --accelerator cpu|gpu \
#              --torch-version 2.13.0 --project DIR --requirements FILE --error-file FILE
#
# 1. venv: `uv venv` unless DIR already holds one (boot.sh makes it first, for boto3).
# 2. the project's dependencies (uv.lock exported as locked, less torch and what only torch
#    needs; else pyproject.toml's; else requirements.txt), less torch and its family
#    (torchvision, torchaudio), plus the project itself when it is a package (installed, not
#    editable); then the agent's (--requirements), for what the project does not name.
# 3. torch, with the family members the project names, from the accelerator's source: cpu
#    asks for exactly VERSION+cpu (torchvision 0.(minor+15).patch+cpu, torchaudio VERSION+cpu),
#    which only the PyTorch CPU index (or a local folder of CPU wheels) has, so no CUDA build
#    or nvidia-* wheel can come in; gpu asks for VERSION from PyPI, whose Linux wheels are the
#    CUDA build.
# 4. the requirements of step 2, from PyPI, with the installed torch and the family's versions
#    as constraints: uv keeps what step 3 installed, and fails rather than change it.
# 5. a family member that came in with another package (timm needs torchvision) is PyPI's
#    build: it is replaced by the build of torch's source, at the same version.
# 6. a check: torch is still the build of step 3, the family is its build, and a CPU venv has
#    no nvidia-* distribution and no CUDA library (in any distribution's RECORD).
# A step that fails writes the installer's own message, on one line, to --error-file.
#
# FABRIC_COMPILE_BYTECODE=1 (the local cluster's cached venvs): the install of step 4 compiles
# the whole venv's bytecode, once, so that no node process pays for it at every start.
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
# Holds userdata/ and training_project/: the payload on a node, the repository here.
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

torch_source=() label=''
case $accelerator in
  cpu)
    label=+cpu
    torch_index=${FABRIC_TORCH_INDEX:-$CPU_TORCH_INDEX}
    ;;
  gpu)
    label=''
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

log "requirements: the project's ($project) and the agent's ($requirements)"
step dependencies env PYTHONPATH="$agent_root" "$venv/bin/python" \
  -m training_project.dependencies \
  --project "$project" --agent-requirements "$requirements" --uv "$uv" \
  --torch-version "$torch_version" --family-pins "$work/family.txt" \
  --family-named "$work/family-named.txt" >"$work/requirements.txt"
sed 's/^/  /' "$work/requirements.txt"

# torch, and the family members the project names, from torch's source, as its build.
torch_specs=("torch==$torch_version$label")
while IFS= read -r pin; do torch_specs+=("$pin$label"); done <"$work/family-named.txt"
log "torch: ${torch_specs[*]} from ${torch_index:-PyPI}"
step torch "${pip_install[@]}" "${torch_source[@]}" "${torch_specs[@]}"
torch_installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
# The build label the family shares with torch: +cpu, +cu130 (from an index) or none (PyPI).
label=${torch_installed#"${torch_installed%%+*}"}

family=$(paste -sd' ' "$work/family.txt")
log "installing them, torch held at $torch_installed, its family at ${family:-(none known)}"
{
  echo "torch==$torch_installed"
  cat "$work/family.txt" # no label: the family members of step 3 (+cpu) satisfy them
} >"$work/constraints.txt"
# From the project folder: a requirements.txt's relative paths (-r, -e, .) are the project's.
compile=()
[[ ${FABRIC_COMPILE_BYTECODE:-} == 1 ]] && compile=(--compile-bytecode)
(cd "$project" && step install "${pip_install[@]}" "${compile[@]}" \
  --constraints "$work/constraints.txt" -r "$work/requirements.txt")

# The installed family members that are not torch's build, one a line: "PIN INSTALLED", where
# PIN is the build wanted (torchvision==0.28.0+cpu) and INSTALLED the version there is.
family_mismatches() {
  "$venv/bin/python" - "$label" "$work/family.txt" <<'PY'
import importlib.metadata as metadata
import sys

label, pins = sys.argv[1], open(sys.argv[2]).read().split()
for pin in pins:
    try:
        installed = metadata.version(pin.split("==")[0])
    except metadata.PackageNotFoundError:
        continue
    if installed != pin.split("==")[1] + label:
        print(pin + label, installed)
PY
}
# Brought in by another package (timm needs torchvision), from PyPI: the build of torch's
# source replaces it, at the same version (its dependencies are already there).
family_mismatches >"$work/foreign.txt"
if [[ -s $work/foreign.txt ]]; then
  mapfile -t foreign < <(cut -d' ' -f1 "$work/foreign.txt")
  log "torch family: ${foreign[*]} from ${torch_index:-PyPI}, for the build another package brought"
  reinstall=()
  for pin in "${foreign[@]}"; do reinstall+=(--reinstall-package "${pin%%==*}"); done
  step family "${pip_install[@]}" "${compile[@]}" "${torch_source[@]}" --no-deps \
    "${reinstall[@]}" "${foreign[@]}"
fi

family_mismatches >"$work/foreign.txt"
summary=$(step check "$venv/bin/python" - "$accelerator" "$torch_installed" \
  "$work/foreign.txt" <<'PY'
import importlib.metadata as metadata
import re
import sys

accelerator, expected, foreign = sys.argv[1:]
# CUDA's libraries as wheels carry them: nvidia/cublas/lib/libcublas.so.13, or auditwheel's
# renamed copies (torchvision.libs/libcudart.faf08d9a.so.13).
CUDA_LIBRARY = re.compile(
    r"(?:^|/)lib(?:cuda|cublas|cudnn|cufft|cufile|curand|cusolver|cusparse|cupti|nccl|nvrtc"
    r"|nvjitlink|nvjpeg|nvtoolsext|nvshmem|nvfatbin)[^/]*\.so(?:\.[^/]*)?$",
    re.IGNORECASE,
)
torch = metadata.version("torch")
if torch != expected:
    sys.exit(f"torch changed from {expected} to {torch} while installing the requirements")
problems = []
for line in open(foreign).read().splitlines():
    pin, installed = line.split()
    name = pin.split("==")[0]
    problems.append(f"{name} {installed} is not the build that goes with torch {torch} ({pin})")
distributions = list(metadata.distributions())
cuda = []
if accelerator == "cpu":
    for dist in distributions:
        name = dist.metadata["Name"]
        library = next((f for f in dist.files or () if CUDA_LIBRARY.search(str(f))), None)
        if library or name.lower().startswith("nvidia-"):
            cuda.append(f"{name} {dist.version}" + (f" ({library})" if library else ""))
if cuda:
    problems.append(f"CUDA in a CPU venv: {', '.join(cuda)}")
if problems:
    sys.exit("; ".join(problems))
cpu = ", no CUDA library" if accelerator == "cpu" else ""
print(f"torch {torch}, {len(distributions)} distributions{cpu}")
PY
)
log "done: $venv ($summary)"

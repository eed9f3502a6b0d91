#!/bin/bash
# Boot script of every node of a fabric cluster: the EC2 user data, byte-for-byte the same on
# every node. What differs between nodes is in their tags (fabric:node-rank); the node agent
# (userdata/agent.py) reads them, finds the main node through SSM and starts `fabric run`.
#
# Phases: uv -> venv -> payload (the user's project under payload/project, the node agent under
# payload/userdata) -> install (userdata/install.sh: torch, the project's dependencies, the
# agent's) -> sharedfs (shared_fs=efs: the run directory's file system mounted, by
# userdata/shared_fs.sh) -> agent (a systemd unit, so it survives and logs to the journal). Every phase is logged with a UTC
# timestamp to $FABRIC_HOME/boot.log and stdout (cloud-init copies stdout to the console and
# /var/log/cloud-init-output.log).
# -E: a failure inside a function runs the ERR trap too (phase recorded, node powered off).
set -Eeuo pipefail

# Settings, rendered by stacks/user_data.py at synth time.
# @@SETTINGS@@

FABRIC_HOME=/opt/fabric
# Rehearsal switches (make rehearse and tests, never on EC2): FABRIC_REHEARSAL_HOME instead of
# /opt/fabric, the agent run directly instead of through systemd, nothing ever powered off;
# then either FABRIC_REHEARSAL_VENV, an existing venv used instead of installing anything, or
# FABRIC_REHEARSAL_UV and FABRIC_REHEARSAL_PYTHON, the uv and the python that the real install
# phases use (no uv download; the python that this machine has).
REHEARSAL=${FABRIC_REHEARSAL_HOME:-}
REHEARSAL_VENV=${FABRIC_REHEARSAL_VENV:-}
PYTHON=${FABRIC_REHEARSAL_PYTHON:-$PYTHON_VERSION}
if [[ -n $REHEARSAL ]]; then
  FABRIC_HOME=$REHEARSAL
  if [[ -z $REHEARSAL_VENV ]]; then
    : "${FABRIC_REHEARSAL_UV:?a rehearsal needs FABRIC_REHEARSAL_VENV or FABRIC_REHEARSAL_UV}"
    : "${FABRIC_REHEARSAL_PYTHON:?FABRIC_REHEARSAL_UV needs FABRIC_REHEARSAL_PYTHON}"
  fi
elif [[ -n $REHEARSAL_VENV ]]; then
  echo "FABRIC_REHEARSAL_VENV needs FABRIC_REHEARSAL_HOME" >&2
  exit 2
fi
VENV=$FABRIC_HOME/venv
PAYLOAD_DIR=$FABRIC_HOME/payload
PROJECT=$PAYLOAD_DIR/project
INSTALL_ERROR=$FABRIC_HOME/install-error.txt
RUN_DIR=$FABRIC_HOME/run
export HOME=${HOME:-/root}
export UV_CACHE_DIR=${UV_CACHE_DIR:-$FABRIC_HOME/cache/uv}
export AWS_DEFAULT_REGION=$REGION
export PYTHONUNBUFFERED=1
mkdir -p "$FABRIC_HOME"
exec > >(tee -a "$FABRIC_HOME/boot.log") 2>&1

phase=start
log() { printf '%s [fabric-boot] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*"; }
begin() {
  phase=$1
  log "phase $phase: $2"
}

# True only on an EC2 instance (Xen: /sys/hypervisor/uuid, Nitro: the DMI asset tag).
on_real_ec2() {
  [[ -z $REHEARSAL && -z ${AWS_EC2_METADATA_SERVICE_ENDPOINT:-} ]] || return 1
  grep -qi '^ec2' /sys/hypervisor/uuid 2>/dev/null && return 0
  grep -q '^i-' /sys/devices/virtual/dmi/id/board_asset_tag 2>/dev/null
}

report_phase() {
  [[ -x $VENV/bin/python && -f $PAYLOAD_DIR/userdata/report.py ]] || return 0
  (cd "$PAYLOAD_DIR" && "$VENV/bin/python" -m userdata.report \
    --phase-parameter "$PHASE_PARAMETER" --members-parameter "$MEMBERS_PARAMETER" \
    --stop-parameter "$STOP_PARAMETER" "$1") || log "could not record phase '$1'"
}

# CloudWatch Logs, one stream per node (userdata/log_shipper.py): boot.log and agent.log, read
# from their start, shipped by a process of its own, so that a slow CloudWatch never stalls
# training. On EC2 a systemd unit: it comes back after a reboot, and at power-off it stops (and
# flushes) after the agent. Shipping logs never fails the boot.
LOG_SHIPPER_PID=$FABRIC_HOME/log-shipper.pid
start_log_shipper() {
  [[ -n $LOG_GROUP && -f $PAYLOAD_DIR/userdata/log_shipper.py ]] || return 0
  local shipper=("$VENV/bin/python" -m userdata.log_shipper --log-group "$LOG_GROUP"
    --stack "$STACK_NAME" --region "$REGION"
    --file "$FABRIC_HOME/boot.log" --file "$FABRIC_HOME/agent.log"
    --state-file "$FABRIC_HOME/log-shipper.state")
  if [[ -z $REHEARSAL ]]; then
    cat >/etc/systemd/system/fabric-logs.service <<EOF
[Unit]
Description=Fabric cluster log shipper (boot, agent and training output to CloudWatch Logs)
Wants=network-online.target
After=network-online.target
# systemd stops units in the reverse of their start order: started before the agent, the
# shipper is stopped after it, and reads and sends the agent's last lines.
Before=fabric-agent.service

[Service]
WorkingDirectory=$PAYLOAD_DIR
ExecStart=${shipper[*]}
Nice=10
Restart=on-failure
# Its flush at SIGTERM takes at most 5 s (log_shipper.FLUSH_SECONDS), then it exits.
TimeoutStopSec=15s

[Install]
WantedBy=multi-user.target
EOF
    { systemctl daemon-reload && systemctl enable --now fabric-logs.service; } ||
      log "logs: the shipper did not start; the logs stay on the node"
  else
    (cd "$PAYLOAD_DIR" && exec nice -n 10 "${shipper[@]}") >>"$FABRIC_HOME/log-shipper.log" 2>&1 &
    echo $! >"$LOG_SHIPPER_PID"
  fi
  log "logs: shipping to CloudWatch Logs group $LOG_GROUP"
}

# Outside systemd only (a rehearsal): let the shipper send what is left, then stop it.
stop_log_shipper() {
  [[ -f $LOG_SHIPPER_PID ]] || return 0
  local pid
  pid=$(cat "$LOG_SHIPPER_PID")
  rm -f "$LOG_SHIPPER_PID"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in {1..100}; do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

on_error() {
  local status=$?
  log "FAILED in phase $phase (exit status $status)"
  if [[ $phase == install && -s $INSTALL_ERROR ]]; then
    # The installer's own message: what a user must fix in the project's dependencies.
    report_phase "failed: install: $(head -c 3000 "$INSTALL_ERROR")"
  else
    report_phase "failed: boot phase $phase (exit status $status)"
  fi
  if [[ $STOP_WHEN_DONE == true && $RECOVER == true ]]; then
    # A powered-off instance of a group would be taken for a failed one and replaced.
    (cd "$PAYLOAD_DIR" && "$VENV/bin/python" -m userdata.node_groups) || true
  fi
  if [[ $STOP_WHEN_DONE == true ]] && on_real_ec2; then
    log "stop_when_done: powering off so that a broken node does not bill"
    systemctl poweroff
  elif [[ $STOP_WHEN_DONE == true ]]; then
    log "stop_when_done: would power off now (not a real EC2 instance)"
  fi
  stop_log_shipper
  exit "$status"
}
trap on_error ERR

log "fabric cluster node boot: stack $STACK_NAME, region $REGION, accelerator $ACCELERATOR"
if [[ -n $REHEARSAL_VENV ]]; then
  log "REHEARSAL: using the venv $REHEARSAL_VENV, skipping every install; power-off disabled"
elif [[ -n $REHEARSAL ]]; then
  log "REHEARSAL: uv $FABRIC_REHEARSAL_UV, python $PYTHON; power-off disabled"
fi

if [[ -n $REHEARSAL && -z $REHEARSAL_VENV ]]; then
  uv=$FABRIC_REHEARSAL_UV
fi
if [[ -z $REHEARSAL ]]; then
  # uv's PyPI wheel, checked against its pinned sha256 before use; the binary is taken out
  # with python3's zipfile (Ubuntu 24.04 has python3 and curl, but no pip or unzip).
  begin uv "installing uv $UV_VERSION from $UV_WHEEL_URL"
  uv_wheel=$FABRIC_HOME/${UV_WHEEL_URL##*/}
  curl --proto '=https' --tlsv1.2 -fsSL --retry 5 -o "$uv_wheel" "$UV_WHEEL_URL"
  echo "$UV_WHEEL_SHA256  $uv_wheel" | sha256sum --check --strict
  uv=$FABRIC_HOME/bin/uv
  mkdir -p "$FABRIC_HOME/bin"
  python3 - "$uv_wheel" "uv-$UV_VERSION.data/scripts/uv" "$uv" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as binary:
    with open(sys.argv[3], "wb") as target:
        shutil.copyfileobj(binary, target)
PY
  chmod 755 "$uv"
  "$uv" --version
fi

if [[ -z $REHEARSAL_VENV ]]; then
  # boto3 first, to fetch the payload; install.sh (in the payload) then fills this venv.
  begin venv "creating $VENV (Python $PYTHON) with boto3"
  "$uv" venv --python "$PYTHON" "$VENV"
  "$uv" pip install --python "$VENV/bin/python" "boto3==$BOTO3_VERSION"
else
  ln -sfn "$REHEARSAL_VENV" "$VENV"
fi

begin payload "fetching $PAYLOAD_URL"
"$VENV/bin/python" - "$PAYLOAD_URL" "$FABRIC_HOME/payload.zip" <<'PY'
import sys

import boto3

bucket, _, key = sys.argv[1].removeprefix("s3://").partition("/")
boto3.client("s3").download_file(bucket, key, sys.argv[2])
PY
rm -rf "$PAYLOAD_DIR"
"$VENV/bin/python" -m zipfile -e "$FABRIC_HOME/payload.zip" "$PAYLOAD_DIR"
start_log_shipper
report_phase installing

if [[ -z $REHEARSAL_VENV ]]; then
  begin install "torch $TORCH_VERSION ($ACCELERATOR build), the project's and the agent's needs"
  bash "$PAYLOAD_DIR/userdata/install.sh" --uv "$uv" --venv "$VENV" --python "$PYTHON" \
    --accelerator "$ACCELERATOR" --torch-version "$TORCH_VERSION" --project "$PROJECT" \
    --requirements "$PAYLOAD_DIR/userdata/requirements-node.txt" --error-file "$INSTALL_ERROR"
else
  begin install "REHEARSAL: skipped, the venv $REHEARSAL_VENV is used as it is"
fi

# The run directory on the file system that every node mounts (shared_fs=efs): every rank
# reads what any rank wrote. Else each node's own disk. run-agent.sh checks the mount again
# at every start of the agent and creates the run directory on it: a folder per run, since a
# redeploy that starts a new run (changed code or arguments) keeps the file system.
shared_check=()
if [[ -n $SHARED_FS && -n $REHEARSAL ]]; then
  : "${FABRIC_REHEARSAL_SHARED_DIR:?a rehearsal of shared_fs=efs needs FABRIC_REHEARSAL_SHARED_DIR}"
  begin sharedfs "REHEARSAL: $FABRIC_REHEARSAL_SHARED_DIR stands for $SHARED_FS"
  RUN_DIR=$FABRIC_REHEARSAL_SHARED_DIR/runs/$RUN_NAME
  shared_check=(test -d "$FABRIC_REHEARSAL_SHARED_DIR") # the folder is the mount
elif [[ -n $SHARED_FS ]]; then
  begin sharedfs "mounting $SHARED_FS at $SHARED_MOUNT"
  shared_check=(bash "$PAYLOAD_DIR/userdata/shared_fs.sh" "$SHARED_FS" "$SHARED_MOUNT")
  "${shared_check[@]}"
  RUN_DIR=$SHARED_MOUNT/runs/$RUN_NAME
else
  mkdir -p "$RUN_DIR"
fi

begin agent "starting the node agent"
stop_flag=()
[[ $STOP_WHEN_DONE == true ]] && stop_flag=(--stop-when-done)
recover_flag=()
[[ $RECOVER == true ]] &&
  recover_flag=(--recover "$STACK_NAME" --capacity-wait-minutes "$CAPACITY_WAIT_MINUTES"
    --max-replacements "$MAX_REPLACEMENTS")
efa_flag=()
[[ $EFA == true ]] && efa_flag=(--efa)
[[ $EFA_RDMA == true ]] && efa_flag+=(--efa-rdma)
agent=("$VENV/bin/python" -m userdata.agent
  --main-address-parameter "$MAIN_ADDRESS_PARAMETER"
  --phase-parameter "$PHASE_PARAMETER"
  --members-parameter "$MEMBERS_PARAMETER"
  --stop-parameter "$STOP_PARAMETER"
  --max-hours "$MAX_HOURS"
  --accelerator "$ACCELERATOR"
  --devices-per-node "$DEVICES_PER_NODE"
  --precision "$PRECISION"
  "${efa_flag[@]}"
  "${recover_flag[@]}"
  --main-port "$MAIN_PORT"
  --max-restarts "$MAX_RESTARTS"
  --run-dir "$RUN_DIR"
  --workdir "$PROJECT"
  --run-name "$RUN_NAME"
  --run-fingerprint "$RUN_FINGERPRINT"
  --inputs "$PAYLOAD_DIR/inputs.json"
  --data-dir "$FABRIC_HOME/data"
  --artifacts-uri "s3://$ARTIFACTS_BUCKET/$STACK_NAME/$RUN_NAME"
  "${stop_flag[@]}"
  "$SCRIPT" -- "${SCRIPT_ARGS[@]}")
{
  echo '#!/bin/bash'
  echo "# Written by the boot script: the node agent's command, run by fabric-agent.service."
  echo "# Cost guard, at every start of the unit: power off after max_hours whatever happens."
  # shellcheck disable=SC2016  # written literally: run-agent.sh expands it at each start
  echo 'if [[ ${FABRIC_POWEROFF:-} == allowed ]]; then'
  printf '  shutdown -P +%d %q\n' "$((MAX_HOURS * 60))" "fabric cluster: max_hours=$MAX_HOURS"
  echo 'else'
  printf '  echo %q\n' "max_hours: would power off in $MAX_HOURS h (power-off not allowed here)"
  echo 'fi'
  # shellcheck disable=SC2016  # written literally: run-agent.sh expands them
  if ((${#shared_check[@]})); then
    # After a stop and start fstab's mount may have failed (nofail): mounted again here, or
    # the node says why, stops the cluster (report) and powers off instead of idling.
    printf 'if ! %s; then\n' "$(printf '%q ' "${shared_check[@]}")"
    printf '  failed=%q\n' "failed: sharedfs: $SHARED_FS is not mounted (the run directory $RUN_DIR)"
    echo '  echo "[fabric-agent] $failed"'
    printf '  (cd %q && %q -m userdata.report --phase-parameter %q --members-parameter %q --stop-parameter %q "$failed")\n' \
      "$PAYLOAD_DIR" "$VENV/bin/python" "$PHASE_PARAMETER" "$MEMBERS_PARAMETER" "$STOP_PARAMETER"
    if [[ $STOP_WHEN_DONE == true && $RECOVER == true ]]; then
      printf '  (cd %q && %q -m userdata.node_groups) || true\n' "$PAYLOAD_DIR" "$VENV/bin/python"
    fi
    if [[ $STOP_WHEN_DONE == true ]]; then
      echo '  if [[ ${FABRIC_POWEROFF:-} == allowed ]]; then'
      echo '    systemctl poweroff'
      echo '  else'
      echo '    echo "stop_when_done: would power off now (not a real EC2 instance)"'
      echo '  fi'
    fi
    echo '  exit 1'
    echo 'fi'
    printf 'mkdir -p %q\n' "$RUN_DIR"
  fi
  # The agent's and the training's output also goes to agent.log, for the log shipper.
  # shellcheck disable=SC2016  # written literally: run-agent.sh expands them
  printf 'cd %q || exit 1\n' "$PAYLOAD_DIR"
  printf '%q ' "${agent[@]}"
  # tee ignores SIGTERM (systemd signals the whole unit): it keeps the agent's last lines.
  printf "2>&1 | (trap '' TERM INT; exec tee -a %q)\n" "$FABRIC_HOME/agent.log"
  # shellcheck disable=SC2016
  echo 'status=${PIPESTATUS[0]}'
  if [[ -n $REHEARSAL ]]; then
    declare -f stop_log_shipper
    printf 'LOG_SHIPPER_PID=%q\n' "$LOG_SHIPPER_PID"
    echo 'stop_log_shipper'
  fi
  # shellcheck disable=SC2016
  echo 'exit "$status"'
} >"$FABRIC_HOME/run-agent.sh"
chmod 755 "$FABRIC_HOME/run-agent.sh"
{
  echo "AWS_DEFAULT_REGION=$REGION"
  echo "PYTHONUNBUFFERED=1"
  echo "HOME=$HOME"
  # The only place that allows the agent to power the node off: a real EC2 boot.
  if on_real_ec2; then echo "FABRIC_POWEROFF=allowed"; fi
} >"$FABRIC_HOME/agent.env"

if [[ -n $REHEARSAL ]]; then
  log "REHEARSAL: running the unit's command directly (no systemd)"
  trap - ERR
  set -a
  # shellcheck disable=SC1091
  source "$FABRIC_HOME/agent.env"
  set +a
  exec "$FABRIC_HOME/run-agent.sh"
fi

# With nofail the shared mount is not ordered before remote-fs.target: after its own unit.
mount_unit=""
[[ -n $SHARED_FS ]] && mount_unit=$(systemd-escape -p --suffix=mount "$SHARED_MOUNT")
cat >/etc/systemd/system/fabric-agent.service <<EOF
[Unit]
Description=Fabric cluster node agent (finds the main node, runs fabric run)
Wants=network-online.target
# After fstab's mounts, but started whether or not the shared one came up: run-agent.sh
# mounts it again, or records why it cannot and powers off (a unit that never starts would
# leave the node idle and billing).
After=network-online.target remote-fs.target ${mount_unit}

[Service]
Type=exec
# A spot notice gives two minutes: the final upload of the newest checkpoint may take most.
TimeoutStopSec=115
EnvironmentFile=$FABRIC_HOME/agent.env
ExecStart=$FABRIC_HOME/run-agent.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable --now --no-block fabric-agent.service
log "boot done: follow the agent with 'journalctl -u fabric-agent -f'"

#!/bin/bash
# Mounts the cluster's shared file system (shared_fs=efs) with the distribution's NFS client
# and AWS's options for EFS, retrying while a new mount target's name resolves (AWS: up to
# 60 s after the mount target is available; here up to --wait, 300 s).
# The boot runs it once (and writes the fstab line, _netdev,nofail); run-agent.sh runs it at
# every start of the agent, because after a stop and start fstab's mount may have failed
# (nofail), and the run directory would then be the node's own empty folder.
#
#   shared_fs.sh [--fstab FILE] [--wait SECONDS] [--retry-every SECONDS] DNS_NAME MOUNT_POINT
#
# Exits 0 once MOUNT_POINT is mounted; else 1, with one line that says why.
set -euo pipefail

fstab=/etc/fstab
wait_seconds=300
retry_every=10
while [[ $# -gt 2 ]]; do
  case $1 in
    --fstab) fstab=$2 ;;
    --wait) wait_seconds=$2 ;;
    --retry-every) retry_every=$2 ;;
    *)
      echo "shared_fs.sh: unknown option $1" >&2
      exit 2
      ;;
  esac
  shift 2
done
if [[ $# -ne 2 ]]; then
  echo "usage: shared_fs.sh [--fstab FILE] [--wait S] [--retry-every S] DNS_NAME MOUNT_POINT" >&2
  exit 2
fi
dns=$1
mount_point=$2
readonly OPTIONS=nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport

log() { printf '%s [fabric-boot] sharedfs: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)" "$*"; }

if ! command -v mount.nfs4 >/dev/null; then
  log "installing nfs-common (this image has no NFS client)"
  DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update
  DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 install nfs-common
fi
mkdir -p "$mount_point"
grep -q " $mount_point " "$fstab" 2>/dev/null ||
  echo "$dns:/ $mount_point nfs4 $OPTIONS,_netdev,nofail 0 0" >>"$fstab"
deadline=$((SECONDS + wait_seconds))
until mountpoint -q "$mount_point"; do
  mount -t nfs4 -o "$OPTIONS" "$dns:/" "$mount_point" && break
  if ((SECONDS >= deadline)); then
    log "$dns did not mount at $mount_point within $wait_seconds s" \
      "(is NFS 2049 open from the nodes' security group, with a mount target in their subnet?)"
    exit 1
  fi
  sleep "$retry_every"
done
log "$dns mounted at $mount_point"

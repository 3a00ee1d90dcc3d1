#!/usr/bin/env bash
# One-host Slurm (munge + slurmctld + slurmd) and OpenMPI for trying the launch scripts and for tests.
#
#   tools/local_cluster.sh start  [DIR]   install if needed, start what is not running, print the SLURM_CONF export
#   tools/local_cluster.sh stop   [DIR]   stop the daemons started from DIR
#   tools/local_cluster.sh status [DIR]   show the daemons and the node; exit 1 if not all are up
#
# DIR (default $MISS_DS_SLURM_DIR or /tmp/miss_ds_slurm) holds the config, state, sockets and logs.
# Needs root and no systemd: the daemons are started by hand. Knobs: MISS_DS_SLURM_CPUS (default: nproc),
# MISS_DS_SLURM_GPUS (fake GPUs so `--gpus-per-node` works, default: the CPU count).
# Usage in a shell: eval "$(tools/local_cluster.sh start)"
set -euo pipefail

cmd=${1:-}
dir=${2:-${MISS_DS_SLURM_DIR:-/tmp/miss_ds_slurm}}
conf=$dir/slurm.conf
munge_dir=$dir/munge
socket=$munge_dir/munge.socket.2
host=$(hostname -s)

log() { echo "local_cluster: $*" >&2; }

# True when the pid file exists and names a live process.
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# True when something listens on this local TCP port.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Start a Slurm daemon unless it runs; a second cluster (another DIR) would find the port taken and die
# after daemonizing, while its clients silently talked to the first one.
start_daemon() {
  local name=$1 port=$2
  alive "$dir/$name.pid" && return
  if port_busy "$port"; then
    log "port $port is taken: is a cluster from another DIR running? (tools/local_cluster.sh stop THAT_DIR)"
    exit 1
  fi
  "$name" -f "$conf"
}

install_packages() {
  local missing=()
  for bin in munged slurmctld slurmd sbatch mpirun g++; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  ((${#missing[@]} == 0)) && return
  log "installing Slurm/munge/OpenMPI (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # g++: DeepSpeed on CPU compiles a small C++ extension the first time it runs.
  apt-get install -y -qq slurm-wlm munge openmpi-bin libopenmpi-dev g++ >/dev/null
}

start_munge() {
  alive "$munge_dir/munged.pid" && return
  # munged refuses a socket folder it finds too open or, at 0700, one clients cannot enter: 0711 works.
  install -d -o munge -g munge -m 0711 "$munge_dir"
  local key=/etc/munge/munge.key
  if [[ ! -s $key ]]; then
    key=$munge_dir/munge.key
    [[ -s $key ]] || runuser -u munge -- mungekey --create --keyfile="$key"
  fi
  runuser -u munge -- munged --socket="$socket" --key-file="$key" --pid-file="$munge_dir/munged.pid" \
    --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed"
}

write_config() {
  local cpus=${MISS_DS_SLURM_CPUS:-$(nproc)}
  local gpus=${MISS_DS_SLURM_GPUS:-$cpus}
  # Leave 1 GiB of the machine's memory out of what the node offers.
  local mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
  # A fresh start forgets the saved jobs: their processes died with the daemons (a restarted machine, a killed
  # test run), yet slurmctld would recover them as RUNNING and let them hold the node, so new jobs pend forever.
  rm -rf "$dir/state" "$dir/spool"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat >"$conf" <<EOF
# Written by tools/local_cluster.sh: one host, root, no cgroups, no accounting.
ClusterName=missds
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 and the short scheduler intervals let a requeued job start again in ~15 s instead of ~2 min.
AuthInfo=socket=$socket,cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
# Lets the node announce more CPUs than it has (MISS_DS_SLURM_CPUS) without being marked invalid.
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem_mb Gres=gpu:$gpus State=UNKNOWN
PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # Fake GPUs: slurmd counts GPUs by their device files, so plain files stand in for /dev/nvidiaN.
  mkdir -p "$dir/fake_gpus"
  for ((i = 0; i < gpus; i++)); do touch "$dir/fake_gpus/nvidia$i"; done
  echo "NodeName=$host Name=gpu File=$dir/fake_gpus/nvidia[0-$((gpus - 1))]" >"$dir/gres.conf"
}

wait_for_node() {
  local state
  for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
    case $state in
      idle | mixed | allocated | completing) return ;; # a trailing '*' would mean not responding yet
      down* | drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  log "node $host not ready (state: ${state:-unknown}); see $dir/log"
  return 1
}

start() {
  ((EUID == 0)) || { log "must run as root"; exit 1; }
  install_packages
  mkdir -p "$dir"
  start_munge
  export SLURM_CONF=$conf
  if ! alive "$dir/slurmctld.pid" || ! alive "$dir/slurmd.pid"; then
    stop_slurm  # the one of the pair still up would keep the state write_config clears
    write_config
    start_daemon slurmctld 6817
    start_daemon slurmd 6818
  fi
  wait_for_node
  log "up: $(sinfo -h -o '%P %D %T %C')"
  echo "export SLURM_CONF=$conf"
}

# Stop the daemons whose pid files are given, and wait until they are gone.
stop_daemons() {
  local pidfile pids=()
  for pidfile in "$@"; do
    alive "$pidfile" || continue
    pids+=("$(cat "$pidfile")")
    kill "${pids[-1]}"
    log "stopping $(basename "$pidfile" .pid) (${pids[-1]})"
  done
  # Wait (each takes ~2 s) so that a following start does not find the ports still bound.
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

stop_slurm() { stop_daemons "$dir/slurmd.pid" "$dir/slurmctld.pid"; }

stop() { stop_daemons "$dir/slurmd.pid" "$dir/slurmctld.pid" "$munge_dir/munged.pid"; }

status() {
  local ok=0 pidfile
  for pidfile in "$munge_dir/munged.pid" "$dir/slurmctld.pid" "$dir/slurmd.pid"; do
    if alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running ($(cat "$pidfile"))"
    else echo "$(basename "$pidfile" .pid): stopped"; ok=1; fi
  done
  ((ok == 0)) && SLURM_CONF=$conf sinfo -N
  return "$ok"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac

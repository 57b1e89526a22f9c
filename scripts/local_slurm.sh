#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the tests and CI (`spat batch --launcher slurm`).
#
#   bash scripts/local_slurm.sh start    install (apt, as root) if missing, start munged,
#                                        slurmctld and slurmd; reuse them when already up
#   bash scripts/local_slurm.sh stop     end exactly the processes `start` started (by PID)
#   bash scripts/local_slurm.sh status   exit 0 when the cluster answers
#
# State, spool, logs, the PID file and slurm.conf live in $SPAT_SLURM_DIR (default
# /tmp/spat-slurm). Slurm's client commands (sbatch, sinfo, ...) read /etc/slurm/slurm.conf,
# so that path becomes a link to our slurm.conf; the script refuses to start when it is a real
# cluster's configuration (use that cluster instead).
set -euo pipefail

DIR=${SPAT_SLURM_DIR:-/tmp/spat-slurm}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
ETC_CONF=/etc/slurm/slurm.conf

log() { echo "local_slurm: $*" >&2; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

cluster_up() {
    [[ -f $PIDS ]] || return 1
    local name pid
    while read -r name pid; do
        [[ $name == munged_external ]] && continue
        alive "$pid" || return 1
    done <"$PIDS"
    timeout 10 sinfo -h -o %T >/dev/null 2>&1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || { log "slurm-wlm/munge missing and not root: apt-get install -y slurm-wlm munge"; exit 1; }
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
    # a munged that already answers (the distribution's service) is used, not ours to stop
    if pgrep -x munged >/dev/null && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        echo "munged_external $(pgrep -x munged | head -1)" >>"$PIDS"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    echo "munged $(cat /run/munge/munged.pid)" >>"$PIDS"
    munge -n </dev/null | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # the memory slurmd detects, so that --mem requests up to it are accepted
    mem=$(slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n 's/^RealMemory=//p' || true)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: one node, this machine
ClusterName=spat-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# a requeued job waits out the credential lifetime before it starts again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# a requeued or cancelled job is gone in seconds, not the default 30 s
KillWait=5
MinJobAge=600
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus ${mem:+RealMemory=$mem} State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

link_conf() {
    mkdir -p /etc/slurm
    if [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
        if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then return; fi
        log "$ETC_CONF exists and is not ours: this machine has a Slurm configuration; use that cluster"
        exit 1
    fi
    ln -s "$CONF" "$ETC_CONF"
}

start() {
    if cluster_up; then
        log "already running (PIDs in $PIDS)"
        cat "$PIDS"
        return
    fi
    [[ -f $PIDS ]] && stop_pids
    install_packages
    [[ $(id -u) == 0 ]] || { log "start needs root (munge key, /run/munge, SlurmUser=root)"; exit 1; }
    mkdir -p "$DIR"
    : >"$PIDS"
    start_munge
    write_conf
    link_conf
    local host
    host=$(hostname -s)
    /usr/sbin/slurmctld -D -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >>"$PIDS"
    /usr/sbin/slurmd -D -f "$CONF" -N "$host" >>"$DIR/log/slurmd.out" 2>&1 &
    echo "slurmd $!" >>"$PIDS"
    local state=""
    for _ in $(seq 120); do
        state=$(timeout 5 sinfo -h -N -o %T 2>/dev/null | head -1 || true)
        case $state in
            idle|mixed|allocated) break ;;
            down*|drain*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    case $state in
        idle|mixed|allocated) ;;
        *) log "node not up (state '${state:-none}'); logs in $DIR/log"; tail -5 "$DIR/log/"*.log >&2 || true
           stop_pids; exit 1 ;;
    esac
    log "cluster up: node $host ($(nproc) CPUs), partition debug; PIDs in $PIDS"
    cat "$PIDS"
}

stop_pids() {
    [[ -f $PIDS ]] || return 0
    local name pid
    # slurmd first: it ends the job steps it runs; munged last, the daemons need it to exit
    for want in slurmd slurmctld munged; do
        while read -r name pid; do
            [[ $name == "$want" ]] || continue
            if alive "$pid"; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
                alive "$pid" && kill -9 "$pid" 2>/dev/null || true
                log "stopped $name (PID $pid)"
            fi
        done <"$PIDS"
    done
    rm -f "$PIDS"
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
}

case ${1:-} in
    start) start ;;
    stop) stop_pids ;;
    status) if cluster_up; then cat "$PIDS"; else log "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for tests and for trying slurm/*.sh.
#
#   slurm/local_cluster.sh start     install Slurm + munge when missing (apt), start munged,
#                                     slurmctld and slurmd with private config/state/logs under
#                                     $SLURM_LOCAL_BASE, wait until the node is idle
#   slurm/local_cluster.sh install   only install the packages when missing (CI does this up front)
#   slurm/local_cluster.sh status    daemons and node state; exit 0 only when all three run
#   slurm/local_cluster.sh env       print `export SLURM_CONF=...` (eval it, or source $BASE/env.sh)
#   slurm/local_cluster.sh stop      cancel this cluster's jobs, stop its daemons (by PID)
#   slurm/local_cluster.sh purge     stop, then delete $SLURM_LOCAL_BASE
#
# Every command is idempotent: `start` on a running cluster only checks it, `stop` on a stopped
# one does nothing. Needs root (the daemons run as root, SlurmUser=root) and, when the packages
# are missing, apt-get (Debian 12: slurm 22.05, munge 0.5.15; ~20 s to install).
#
# Settings (environment):
#   SLURM_LOCAL_BASE  base folder, at most 50 characters (Unix socket paths are capped at 108
#                     bytes)                                          default /tmp/apollo-slurm
#   SLURM_LOCAL_PORT  slurmctld port; slurmd uses PORT+1                        default 6817
#   SLURM_LOCAL_CPUS  CPUs the node declares (may exceed the hardware)  default max(nproc, 2)
#   SLURM_LOCAL_GPUS  fake GPUs (gres, /dev/null-like char devices) so --gpus-per-node works
#                     on a machine without GPUs; tasks must still check torch.cuda  default 0
#   SLURM_LOCAL_FIRST_JOB_ID  first job id (each start clears state, so ids restart there);
#                     tests pick a random one so that per-job ports derived from the job id
#                     (e.g. MASTER_PORT) differ between clusters on one machine     default 1
#
# Clients (sbatch, srun, squeue, scontrol, scancel, sinfo) need SLURM_CONF=$BASE/etc/slurm.conf.
# No cgroups are needed (proctrack/linuxproc, task/none); no slurmdbd, so no sacct:
# $BASE/log/jobcomp.log has one line per finished job and `scontrol show job` keeps finished
# jobs for MinJobAge=300 s.
set -euo pipefail

BASE=${SLURM_LOCAL_BASE:-/tmp/apollo-slurm}
PORT=${SLURM_LOCAL_PORT:-6817}
DPORT=$((PORT + 1))
NCPU=$(nproc 2>/dev/null || echo 2)
CPUS=${SLURM_LOCAL_CPUS:-$((NCPU > 2 ? NCPU : 2))}
GPUS=${SLURM_LOCAL_GPUS:-0}
FIRST_JOB_ID=${SLURM_LOCAL_FIRST_JOB_ID:-1}
NODE=localhost
CONF=$BASE/etc/slurm.conf
MARK=$BASE/.apollo-local-slurm
PKGS=(slurmctld slurmd slurm-client munge)

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ----------------------------------------------------------------------------- processes
# The PID in pid file $1 if it is alive, is not a zombie, and its command line contains $2.
pid_of() {
    local f=$1 want=$2 pid state
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [[ $state != Z && $state != X ]] || return 1      # PID 1 may reap late (pitfall 17)
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$want" || return 1
    echo "$pid"
}

munged_pid()    { pid_of "$BASE/run/munged.pid" "$BASE/munge/munge.socket.2"; }
slurmctld_pid() { pid_of "$BASE/run/slurmctld.pid" "$CONF"; }
slurmd_pid()    { pid_of "$BASE/run/slurmd.$NODE.pid" "$CONF"; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_pid() {   # name pid: TERM, wait up to 10 s, then KILL
    local name=$1 pid=$2 i state
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 50); do
        [[ -r /proc/$pid/status ]] || { say "stopped $name ($pid)"; return 0; }
        state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        [[ $state == Z || -z $state ]] && { say "stopped $name ($pid)"; return 0; }
        sleep 0.2
    done
    say "$name ($pid) ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# ----------------------------------------------------------------------------- install
install_packages() {
    local missing=() p
    for p in slurmctld slurmd sbatch srun scontrol munged; do
        command -v "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "Slurm is not installed (missing: ${missing[*]}) and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed (missing: ${missing[*]}) and apt-get is not available"
    say "installing ${PKGS[*]} (apt, no recommends)"
    # Debian's postinst must not start the system-wide daemons: deny service starts while we
    # install, unless the machine already has a policy (containers usually do).
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}"; } >&2 || rc=$?
    [[ $added -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get install ${PKGS[*]} failed (rc $rc)"
}

# ----------------------------------------------------------------------------- config
write_config() {
    local mem gres_line="" node_gres=""
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    if [[ $GPUS -gt 0 ]]; then
        mkdir -p "$BASE/dev"
        local i
        for ((i = 0; i < GPUS; i++)); do
            [[ -c $BASE/dev/fakegpu$i ]] || { rm -f "$BASE/dev/fakegpu$i"; mknod "$BASE/dev/fakegpu$i" c 1 3; }
        done
        gres_line="GresTypes=gpu"
        node_gres=" Gres=gpu:$GPUS"
        echo "NodeName=$NODE Name=gpu File=$BASE/dev/fakegpu[0-$((GPUS - 1))]" >"$BASE/etc/gres.conf"
    else
        rm -f "$BASE/etc/gres.conf"
    fi
    cat >"$CONF.tmp" <<EOF
# generated by slurm/local_cluster.sh: a single-machine test cluster (do not edit; rewritten on start)
ClusterName=apollolocal
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$DPORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket.2
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd.%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here: the default proctrack/cgroup makes every job "complete" without running
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: no sacct; one line per finished job instead
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# refuse impossible requests at submit time instead of pending forever
EnforcePartLimits=ALL
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
$gres_line
NodeName=$NODE NodeHostname=localhost NodeAddr=127.0.0.1 Port=$DPORT CPUs=$CPUS RealMemory=$mem${node_gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
}

# ----------------------------------------------------------------------------- commands
node_state() { SLURM_CONF=$CONF scontrol show node "$NODE" -o 2>/dev/null | grep -o 'State=[^ ]*' | cut -d= -f2; }

cmd_start() {
    [[ ${#BASE} -le 50 ]] || die "SLURM_LOCAL_BASE=$BASE is ${#BASE} characters; at most 50 (Unix socket paths are capped at 108 bytes)"
    [[ $BASE == /* ]] || die "SLURM_LOCAL_BASE must be an absolute path"
    [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root; run as root"
    install_packages
    mkdir -p "$BASE"/{etc,munge,state,spool,run,log}
    touch "$MARK"
    chmod 0711 "$BASE" "$BASE/munge"     # munged wants an executable-for-all socket folder

    local mp cp dp
    mp=$(munged_pid || true); cp=$(slurmctld_pid || true); dp=$(slurmd_pid || true)
    if [[ -z $cp ]] && port_busy "$PORT"; then
        die "port $PORT is taken by another program; set SLURM_LOCAL_PORT"
    fi
    if [[ -z $dp ]] && port_busy "$DPORT"; then
        die "port $DPORT is taken by another program; set SLURM_LOCAL_PORT"
    fi
    # Rewrite the config only while no Slurm daemon of ours uses it.
    if [[ -z $cp && -z $dp ]]; then
        write_config
    fi

    if [[ -z $mp ]]; then
        if [[ ! -s $BASE/munge/munge.key ]]; then
            dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
        fi
        chown root:root "$BASE/munge/munge.key"
        chmod 0400 "$BASE/munge/munge.key"
        rm -f "$BASE/munge/munge.socket.2" "$BASE/munge/munge.socket.2.lock"
        munged --force --socket="$BASE/munge/munge.socket.2" --key-file="$BASE/munge/munge.key" \
            --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" \
            --seed-file="$BASE/munge/munged.seed" </dev/null >/dev/null 2>&1 \
            || die "munged failed to start; see $BASE/log/munged.log"
        for _ in $(seq 1 50); do [[ -S $BASE/munge/munge.socket.2 ]] && break; sleep 0.1; done
        mp=$(munged_pid) || die "munged is not running; see $BASE/log/munged.log"
        say "started munged ($mp)"
    fi
    if [[ -z $cp ]]; then
        slurmctld -f "$CONF" -c </dev/null >/dev/null 2>&1 \
            || die "slurmctld failed to start; see $BASE/log/slurmctld.log"
        for _ in $(seq 1 50); do cp=$(slurmctld_pid || true); [[ -n $cp ]] && break; sleep 0.1; done
        [[ -n $cp ]] || die "slurmctld is not running; see $BASE/log/slurmctld.log"
        say "started slurmctld ($cp)"
    fi
    if [[ -z $dp ]]; then
        slurmd -f "$CONF" -N "$NODE" -c </dev/null >/dev/null 2>&1 \
            || die "slurmd failed to start; see $BASE/log/slurmd.$NODE.log"
        for _ in $(seq 1 50); do dp=$(slurmd_pid || true); [[ -n $dp ]] && break; sleep 0.1; done
        [[ -n $dp ]] || die "slurmd is not running; see $BASE/log/slurmd.$NODE.log"
        say "started slurmd ($dp)"
    fi

    local st="" resumed=0
    for _ in $(seq 1 150); do
        st=$(node_state || true)
        case $st in
            IDLE*|MIXED*|ALLOCATED*) break ;;
            *DRAIN*|DOWN*|*INVAL*)
                if [[ $resumed -eq 0 ]]; then
                    SLURM_CONF=$CONF scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    case $st in
        IDLE*|MIXED*|ALLOCATED*) ;;
        *) die "node $NODE is '${st:-unknown}' after 30 s; see $BASE/log/slurmd.$NODE.log and slurmctld.log" ;;
    esac
    say "cluster up: node $NODE $st, $CPUS CPUs, $GPUS GPUs, ports $PORT/$DPORT, base $BASE"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    local cp dp mp jobs
    cp=$(slurmctld_pid || true); dp=$(slurmd_pid || true); mp=$(munged_pid || true)
    if [[ -n $cp && -n $dp && -n $mp ]]; then
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 50); do
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    [[ -n $dp ]] && stop_pid slurmd "$dp"
    [[ -n $cp ]] && stop_pid slurmctld "$cp"
    [[ -n $mp ]] && stop_pid munged "$mp"
    [[ -z $dp && -z $cp && -z $mp ]] && say "not running (base $BASE)"
    return 0
}

cmd_status() {
    local ok=0 p
    p=$(munged_pid || true);    echo "munged:    ${p:-stopped}";    [[ -n $p ]] || ok=1
    p=$(slurmctld_pid || true); echo "slurmctld: ${p:-stopped}";    [[ -n $p ]] || ok=1
    p=$(slurmd_pid || true);    echo "slurmd:    ${p:-stopped}";    [[ -n $p ]] || ok=1
    if [[ $ok -eq 0 ]]; then
        echo "node:      $NODE $(node_state || echo unknown)"
        echo "SLURM_CONF=$CONF"
    fi
    return $ok
}

cmd_purge() {
    cmd_stop
    if [[ -d $BASE ]]; then
        [[ -e $MARK ]] || die "$BASE was not made by local_cluster.sh; not deleting it"
        rm -rf "$BASE"
        say "removed $BASE"
    fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    install) install_packages ;;
    purge) cmd_purge ;;
    *) echo "usage: $0 start|stop|status|env|install|purge   (see the header for settings)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real Slurm cluster on this machine (one node, or several emulated nodes), for tests and for
# trying slurm/*.sh.
#
#   slurm/local_cluster.sh start     install Slurm + munge when missing (apt), start munged,
#                                     slurmctld and one slurmd per node with private
#                                     config/state/logs under $SLURM_LOCAL_BASE, wait until
#                                     every node is idle
#   slurm/local_cluster.sh install   only install the packages when missing (CI does this up front)
#   slurm/local_cluster.sh status    daemons and node states; exit 0 only when all of them run
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
#   SLURM_LOCAL_PORT  slurmctld port; node i's slurmd uses PORT+i               default 6817
#   SLURM_LOCAL_NODES 1: one node named localhost. N > 1: N emulated nodes node1..nodeN, one
#                     slurmd each (`slurmd -N nodeI`, NodeHostname=localhost, its own Port=),
#                     so `sbatch --nodes=N` runs here; every node declares SLURM_LOCAL_CPUS
#                     CPUs, i.e. the nodes share (oversubscribe) the real cores. The names do
#                     not resolve (no /etc/hosts edit): apollo_ds/distributed.py falls back to
#                     the node's NodeAddr (127.0.0.1) for MASTER_ADDR.          default 1
#   SLURM_LOCAL_CPUS  CPUs each node declares (may exceed the hardware)  default max(nproc, 2)
#   SLURM_LOCAL_GPUS  fake GPUs (gres, /dev/null-like char devices) so --gpus-per-node works
#                     on a machine without GPUs; tasks must still check torch.cuda  default 0
#   SLURM_LOCAL_REQUEUE_WAIT  seconds a requeued job (`scontrol requeue`, node failure) waits
#                     before it may start again: AuthInfo=cred_expire, which is also the job
#                     step credential's lifetime (Slurm's default 120)              default 10
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
NCPU=$(nproc 2>/dev/null || echo 2)
CPUS=${SLURM_LOCAL_CPUS:-$((NCPU > 2 ? NCPU : 2))}
GPUS=${SLURM_LOCAL_GPUS:-0}
FIRST_JOB_ID=${SLURM_LOCAL_FIRST_JOB_ID:-1}
CRED_EXPIRE=${SLURM_LOCAL_REQUEUE_WAIT:-10}
NODES=${SLURM_LOCAL_NODES:-1}
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "local_cluster: error: SLURM_LOCAL_NODES=$NODES: use a number from 1 to 99" >&2; exit 2; }
if [[ $NODES -eq 1 ]]; then NODE_NAMES=(localhost); else NODE_NAMES=($(seq -f 'node%g' 1 "$NODES")); fi
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
slurmd_pid()    { pid_of "$BASE/run/slurmd.$1.pid" "$CONF"; }     # node name
node_port()     { echo $((PORT + 1 + $1)); }                         # node index, from 0
any_slurmd()    { local n; for n in "${NODE_NAMES[@]}"; do slurmd_pid "$n" && return 0; done; return 1; }

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
    local mem gres_line="" node_gres="" node_lines="" i
    mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    if [[ $GPUS -gt 0 ]]; then
        mkdir -p "$BASE/dev"
        local i
        for ((i = 0; i < GPUS; i++)); do
            [[ -c $BASE/dev/fakegpu$i ]] || { rm -f "$BASE/dev/fakegpu$i"; mknod "$BASE/dev/fakegpu$i" c 1 3; }
        done
        gres_line="GresTypes=gpu"
        node_gres=" Gres=gpu:$GPUS"
        : >"$BASE/etc/gres.conf"
        for n in "${NODE_NAMES[@]}"; do   # the nodes share the fake devices, like the CPUs
            echo "NodeName=$n Name=gpu File=$BASE/dev/fakegpu[0-$((GPUS - 1))]" >>"$BASE/etc/gres.conf"
        done
    else
        rm -f "$BASE/etc/gres.conf"
    fi
    for i in "${!NODE_NAMES[@]}"; do
        node_lines+="NodeName=${NODE_NAMES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(node_port "$i") CPUs=$CPUS RealMemory=$mem${node_gres} State=UNKNOWN"$'\n'
    done
    cat >"$CONF.tmp" <<EOF
# generated by slurm/local_cluster.sh: a single-machine test cluster (do not edit; rewritten on start)
# nodes: ${NODE_NAMES[*]}
ClusterName=apollolocal
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$BASE/munge/munge.socket.2,cred_expire=$CRED_EXPIRE
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
# look at pending jobs every 2 s (default 60/30 s): a requeued job starts soon after its wait
SchedulerParameters=sched_interval=2,bf_interval=2
# refuse impossible requests at submit time instead of pending forever
EnforcePartLimits=ALL
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
MinJobAge=300
# time between SIGTERM and SIGKILL on cancel/requeue: room for a checkpoint (Slurm's default)
KillWait=30
InactiveLimit=0
SlurmdTimeout=60
$gres_line
${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    echo "export SLURM_CONF=$CONF" >"$BASE/env.sh"
}

# ----------------------------------------------------------------------------- commands
node_state() { SLURM_CONF=$CONF scontrol show node "$1" -o 2>/dev/null | grep -o 'State=[^ ]*' | cut -d= -f2; }

# The node names of the config written last ("# nodes: ..."), empty when there is none.
config_nodes() { [[ -r $CONF ]] && sed -n 's/^# nodes: //p' "$CONF" || true; }
# stop/status act on the nodes the config names (SLURM_LOCAL_NODES may differ from the start's)
use_config_nodes() {
    local names
    read -r -a names <<<"$(config_nodes)"
    [[ ${#names[@]} -gt 0 ]] && NODE_NAMES=("${names[@]}")
    return 0
}

wait_idle() {   # node: wait up to 30 s for IDLE/MIXED/ALLOCATED, resuming a drained node once
    local node=$1 st="" resumed=0
    for _ in $(seq 1 150); do
        st=$(node_state "$node" || true)
        case $st in
            IDLE*|MIXED*|ALLOCATED*) echo "$st"; return 0 ;;
            *DRAIN*|DOWN*|*INVAL*)
                if [[ $resumed -eq 0 ]]; then
                    SLURM_CONF=$CONF scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    die "node $node is '${st:-unknown}' after 30 s; see $BASE/log/slurmd.$node.log and slurmctld.log"
}

cmd_start() {
    [[ ${#BASE} -le 50 ]] || die "SLURM_LOCAL_BASE=$BASE is ${#BASE} characters; at most 50 (Unix socket paths are capped at 108 bytes)"
    [[ $BASE == /* ]] || die "SLURM_LOCAL_BASE must be an absolute path"
    [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root; run as root"
    install_packages
    mkdir -p "$BASE"/{etc,munge,state,spool,run,log}
    touch "$MARK"
    chmod 0711 "$BASE" "$BASE/munge"     # munged wants an executable-for-all socket folder

    local mp cp dp i n st running
    mp=$(munged_pid || true); cp=$(slurmctld_pid || true)
    if [[ -n $cp ]] || any_slurmd >/dev/null; then
        running=$(config_nodes)
        [[ $running == "${NODE_NAMES[*]}" ]] \
            || die "the cluster at $BASE runs with nodes '$running', not '${NODE_NAMES[*]}' (SLURM_LOCAL_NODES=$NODES); run '$0 stop' first"
    fi
    if [[ -z $cp ]] && port_busy "$PORT"; then
        die "port $PORT is taken by another program; set SLURM_LOCAL_PORT"
    fi
    for i in "${!NODE_NAMES[@]}"; do
        if ! slurmd_pid "${NODE_NAMES[$i]}" >/dev/null && port_busy "$(node_port "$i")"; then
            die "port $(node_port "$i") (slurmd of ${NODE_NAMES[$i]}) is taken by another program; set SLURM_LOCAL_PORT"
        fi
    done
    # Rewrite the config only while no Slurm daemon of ours uses it.
    if [[ -z $cp ]] && ! any_slurmd >/dev/null; then
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
    for n in "${NODE_NAMES[@]}"; do
        dp=$(slurmd_pid "$n" || true)
        [[ -n $dp ]] && continue
        # -N: this slurmd is node $n whatever the machine's hostname (several share one host)
        slurmd -f "$CONF" -N "$n" -c </dev/null >/dev/null 2>&1 \
            || die "slurmd -N $n failed to start; see $BASE/log/slurmd.$n.log"
        for _ in $(seq 1 50); do dp=$(slurmd_pid "$n" || true); [[ -n $dp ]] && break; sleep 0.1; done
        [[ -n $dp ]] || die "slurmd of $n is not running; see $BASE/log/slurmd.$n.log"
        say "started slurmd -N $n ($dp)"
    done

    local states=()
    for n in "${NODE_NAMES[@]}"; do st=$(wait_idle "$n") || exit 1; states+=("$n $st"); done
    say "cluster up: $(IFS=,; echo "${states[*]}"); $CPUS CPUs and $GPUS GPUs per node," \
        "ports $PORT (slurmctld) $(node_port 0)-$(node_port $((NODES - 1))) (slurmd), base $BASE"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    local cp mp jobs n p dps=()
    cp=$(slurmctld_pid || true); mp=$(munged_pid || true)
    use_config_nodes
    for n in "${NODE_NAMES[@]}"; do p=$(slurmd_pid "$n" || true); [[ -n $p ]] && dps+=("$n:$p"); done
    if [[ -n $cp && -n $mp && ${#dps[@]} -gt 0 ]]; then
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 200); do     # KillWait is 30 s
                [[ -z $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true) ]] && break
                sleep 0.2
            done
        fi
    fi
    for p in "${dps[@]}"; do stop_pid "slurmd ${p%%:*}" "${p#*:}"; done
    [[ -n $cp ]] && stop_pid slurmctld "$cp"
    [[ -n $mp ]] && stop_pid munged "$mp"
    [[ ${#dps[@]} -eq 0 && -z $cp && -z $mp ]] && say "not running (base $BASE)"
    return 0
}

cmd_status() {
    local ok=0 p n
    use_config_nodes
    p=$(munged_pid || true);    echo "munged:    ${p:-stopped}";    [[ -n $p ]] || ok=1
    p=$(slurmctld_pid || true); echo "slurmctld: ${p:-stopped}";    [[ -n $p ]] || ok=1
    for n in "${NODE_NAMES[@]}"; do
        p=$(slurmd_pid "$n" || true); echo "slurmd:    ${p:-stopped} ($n)"; [[ -n $p ]] || ok=1
    done
    if [[ $ok -eq 0 ]]; then
        for n in "${NODE_NAMES[@]}"; do echo "node:      $n $(node_state "$n" || echo unknown)"; done
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

#!/usr/bin/env bash
# Start a single-node Slurm 22.05 (with munge) on localhost by hand, no systemd.
# Idempotent: when slurmctld and slurmd already run with this script's slurm.conf and the node is
# usable, it does nothing. Needs root and the packages from .ci/install_system.sh.
#
#
# Observed on Debian 12, Slurm 22.05.8 with this config:
#   sbatch --wrap 'echo hi'  -> stdout "Submitted batch job 7"; --parsable prints the bare "7".
#   qsub job.sh              -> stdout the bare job number "7\n", exit 0. qsub is a Perl wrapper
#                               that runs sbatch; on failure it prints "There was an error running
#                               the Slurm sbatch command. ..." on STDOUT and exits 1. Default
#                               output files are <script-name>.o<ID> / .e<ID> in the cwd.
#                               `qsub -v A=1` means sbatch --export=none,A=1 (the rest of the
#                               environment is dropped); `qsub -V -v A=1` keeps it. Plain qsub
#                               (no -v) exports everything, like sbatch.
#   qstat ID                 -> a table, exit 0:
#       Job id              Name             Username        Time Use S Queue
#       ------------------- ---------------- --------------- -------- - ---------------
#       2                   kdtest           root            00:00:00 R debug
#     the S column is Q (pending), R (running), S (suspended) or C (completed, failed,
#     cancelled and timed out alike); a finished job shows C for MinJobAge (300 s) after it ends.
#     Once the job is gone (or never existed): no output at all and exit status 153. Bare `qstat`
#     with no jobs known also exits 153 (per its source). `qstat -f ID` gives "job_state = C"
#     etc. but no exit status.
#   squeue -j ID             -> ST codes PD, R, CG; a finished job within MinJobAge prints only the
#                               header (exit 0); `squeue -h -t all -j ID -o %T` prints PENDING,
#                               RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED or TIMEOUT.
#                               A gone job: "slurm_load_jobs error: Invalid job id specified" on
#                               stderr, exit 1. `scontrol show job ID` gives JobState= and
#                               ExitCode=N:S while the job is known; sacct does not work (no
#                               accounting).
#   qdel ID / scancel ID     -> silent, exit 0; the batch script gets SIGTERM, state CANCELLED.
#   --time / -l walltime     -> enforced: slurmctld checks every ~30 s (observed: 11 s late), sends
#                               SIGTERM, SIGKILL 5 s later (KillWait), state TIMEOUT; units: minutes.
#   Inside every job (sbatch or qsub): SLURM_JOB_ID and, through spank_pbs, PBS_JOBID,
#   PBS_O_WORKDIR, PBS_JOBNAME, ... are set, so check SLURM_JOB_ID first to tell Slurm from a real
#   PBS. sbatch also honours "#PBS -N" / "#PBS -l walltime" lines in a script without #SBATCH.
#   With OverSubscribe=FORCE:4 and 2 CPUs, 8 one-CPU jobs run at once; new jobs start within a
#   few seconds of submission.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "start_slurm.sh: must run as root" >&2
    exit 1
fi

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
PLUGSTACK_DIR="$CONF_DIR/plugstack.conf.d"
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd

pid_alive() {  # pid_alive PIDFILE: the process named in PIDFILE is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {  # the node's state as sinfo prints it (idle, mix, alloc, down*, drain, ...)
    sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n 1
}

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "start_slurm.sh: starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null
fi

# ---------------------------------------------------------------- slurm.conf
# Advertise a bit less than the machine has: a node whose CPUs/RealMemory exceed what slurmd
# finds is drained. Memory is not a consumable resource (CR_CPU), so jobs share it freely.
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

new_conf=$(cat <<EOF
# Written by .ci/start_slurm.sh: a single-node CI cluster on localhost.
ClusterName=kdci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Finished jobs stay visible to squeue/qstat/scontrol for 5 minutes.
MinJobAge=300
# Walltime (--time) kills: SIGTERM, then SIGKILL 5 s later.
KillWait=5
OverTimeLimit=0
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
# FORCE:4 lets up to 4 jobs share each CPU, so 4 * nproc one-CPU jobs run at once.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
)

# PBS_JOBID, PBS_O_WORKDIR, ... inside jobs come from this SPANK plugin.
new_plugstack="optional /usr/lib/x86_64-linux-gnu/slurm-wlm/spank_pbs.so"

conf_changed=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; then
    conf_changed=1
fi
if [ "$(cat "$PLUGSTACK_DIR/pbs.conf" 2>/dev/null)" != "$new_plugstack" ]; then
    conf_changed=1
fi
if ! grep -qs "^include $PLUGSTACK_DIR/\*.conf" "$CONF_DIR/plugstack.conf"; then
    conf_changed=1
fi

# ---------------------------------------------------------------- already up?
if [ "$conf_changed" -eq 0 ] && pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid"; then
    case "$(node_state)" in
        idle | mix* | alloc* | completing*)
            echo "start_slurm.sh: slurm already running"
            exit 0
            ;;
    esac
fi

# ---------------------------------------------------------------- (re)start
# Stop daemons this script started before (by their pid files) so the new config is read.
for daemon in slurmd slurmctld; do
    pidfile="$RUN_DIR/$daemon.pid"
    if pid_alive "$pidfile"; then
        echo "start_slurm.sh: stopping $daemon"
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    fi
done

install -d -m 0755 "$CONF_DIR" "$PLUGSTACK_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
printf '%s\n' "$new_conf" >"$CONF"
printf '%s\n' "$new_plugstack" >"$PLUGSTACK_DIR/pbs.conf"
if ! grep -qs "^include $PLUGSTACK_DIR/\*.conf" "$CONF_DIR/plugstack.conf"; then
    echo "include $PLUGSTACK_DIR/*.conf" >>"$CONF_DIR/plugstack.conf"
fi

echo "start_slurm.sh: starting slurmctld and slurmd (CPUs=$cpus RealMemory=$mem_mb)"
slurmctld
slurmd -N localhost

ready=0
for _ in $(seq 60); do
    state=$(node_state || true)
    case "$state" in
        idle | mix* | alloc*)
            ready=1
            break
            ;;
        down* | drain* | fail*)
            # e.g. left drained by an earlier run: put it back in service.
            scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    sleep 1
done
if [ "$ready" -ne 1 ]; then
    echo "start_slurm.sh: node not idle after 60 s (state: ${state:-unknown})" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
fi
sinfo

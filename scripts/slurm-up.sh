#!/usr/bin/env bash
# A single-node SLURM on localhost for the tests under tests/slurm/ (as root; idempotent).
# Installs Debian's slurm-wlm, munge, slurmdbd and MariaDB when absent, writes /etc/slurm/slurm.conf
# sized to this machine, starts munged, MariaDB, slurmdbd, slurmctld and slurmd, and waits until the
# node is idle.
# Job history: slurmdbd on MariaDB gives `sacct`; jobcomp/filetxt also writes each finished job to
# /var/log/slurm/jobcomp.log; squeue --states=all shows ended jobs for MinJobAge seconds (kiln reads
# a batch job's end state from there).
set -euo pipefail

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v slurmdbd >/dev/null \
        || ! command -v mariadbd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
fi

test -f /etc/munge/munge.key || mungekey -c
chown munge:munge /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force 2>/dev/null || munged
for _ in $(seq 50); do munge -n | unmunge 2>/dev/null | grep -q Success && break; sleep 0.1; done

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm

# accounting: MariaDB (unix socket, no network) and slurmdbd
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
if ! pgrep -x mariadbd >/dev/null; then
    (mysqld_safe >/var/log/slurm/mariadb.log 2>&1 &)
fi
for _ in $(seq 100); do mysql -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
cat > /etc/slurm/slurmdbd.conf <<DBD
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
DBD
chmod 600 /etc/slurm/slurmdbd.conf
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 50); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done

cpus=$(nproc)
# leave the machine some memory of its own; slurmd refuses a node that claims more than it has
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
conf=$(cat <<CONF
ClusterName=local
SlurmctldHost=localhost
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmUser=root
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
# a walltime kill lands within seconds, not the default 30 s grace
KillWait=5
OverTimeLimit=0
MinJobAge=600
MpiDefault=none
NodeName=localhost CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
if [ ! -f /etc/slurm/slurm.conf ] || [ "$(cat /etc/slurm/slurm.conf)" != "$conf" ]; then
    printf '%s\n' "$conf" > /etc/slurm/slurm.conf
    changed=1
fi

sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
if [ "${changed:-0}" = 1 ] && [ -f /run/slurmctld.pid ] && pgrep -x slurmctld >/dev/null; then
    # a new accounting or scheduling setup needs a restarted controller, not a reconfigure
    kill "$(cat /run/slurmctld.pid)"
    for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || break; sleep 0.2; done
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd 2>/dev/null || slurmd

for _ in $(seq 100); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        sinfo
        exit 0
    fi
    # a node left down by an earlier run comes back
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.2
done
echo "slurm-up: the node did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1

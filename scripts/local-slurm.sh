#!/usr/bin/env bash
# A real single-node SLURM cluster with accounting, on this machine, for the tests and for trying
# `isoflop submit` on a laptop. Needs root (slurmd runs jobs as any user; apt-get installs).
#
#   scripts/local-slurm.sh up       install what is missing (apt-get), write configs, start the daemons
#                                   and wait until the node is idle; safe to run again (idempotent)
#   scripts/local-slurm.sh down     cancel the cluster's jobs and stop every daemon `up` started
#   scripts/local-slurm.sh status   exit 0 and say so if the node is up, else exit 1
#   scripts/local-slurm.sh env      print the line that points SLURM commands at this cluster:
#                                       eval "$(scripts/local-slurm.sh env)"
# Exit status 3 means SLURM could not be installed (not root, no apt-get, apt-get failed).
#
# Everything lives under $ISOFLOP_SLURM_ROOT (default /tmp/isoflop-slurm): configs, munge key and
# socket, the MariaDB data, state, logs and pid files; `rm -rf` it after `down` to start afresh.
# Nothing is written to /etc, and no system service is started, so it works without systemd (in a
# container, on CI) and beside a real SLURM install. Ports: $ISOFLOP_SLURM_PORT (slurmctld, default
# 6817), +1 slurmd, +2 slurmdbd, +3 MariaDB (127.0.0.1 only).
#
# Why each setting is what it is (checked on Debian 12, SLURM 22.05):
# - accounting through slurmdbd + MariaDB: with accounting_storage/none `sacct` is off, so nobody
#   (isoflop status, submitit) can learn that a job failed or was cancelled;
# - AuthInfo=...,cred_expire=5 and bf_interval=1,sched_interval=2: a requeued job may start again
#   once the credential lifetime has passed (default 120 s), and the scheduler then has to look
#   (default every 60 s); with these it restarts ~7 s after a requeue;
# - AccountingStoragePass=<munge socket>: else slurmctld looks for munge's default socket;
# - proctrack/linuxproc, task/none, jobacct_gather/none: no cgroups needed;
# - the node is called localhost (slurmd -N localhost) whatever this host's name is.
set -euo pipefail

ROOT=${ISOFLOP_SLURM_ROOT:-/tmp/isoflop-slurm}
CLUSTER=${ISOFLOP_SLURM_CLUSTER:-isoflop}
PORT=${ISOFLOP_SLURM_PORT:-6817}
CTLD_PORT=$PORT SLURMD_PORT=$((PORT + 1)) DBD_PORT=$((PORT + 2)) DB_PORT=$((PORT + 3))
START_TIMEOUT_S=${ISOFLOP_SLURM_START_TIMEOUT:-90}
PACKAGES=(slurmctld slurmd slurm-client munge mariadb-server slurmdbd)
# A program from each package, to tell whether it is installed.
PROGRAMS=(slurmctld slurmd sbatch munged mariadbd slurmdbd)

ETC=$ROOT/etc RUN=$ROOT/run LOG=$ROOT/log STATE=$ROOT/state
MUNGE_SOCKET=$RUN/munge/munge.socket.2
MYSQL_SOCKET=$RUN/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf

EXIT_CANNOT_INSTALL=3  # the tests skip on this one only: anything else is a failure to look at

say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: error: $*" >&2; exit 1; }
cannot_install() { echo "local-slurm: cannot install SLURM: $*" >&2; exit $EXIT_CANNOT_INSTALL; }

# -- install -------------------------------------------------------------------------------------

missing_programs() {
  local program
  for program in "${PROGRAMS[@]}"; do
    command -v "$program" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$program" >/dev/null 2>&1 \
      || echo "$program"
  done
}

install_packages() {
  local missing
  missing=$(missing_programs)
  [[ -z $missing ]] && return 0
  [[ $(id -u) == 0 ]] || cannot_install "$(echo $missing) missing and not root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || cannot_install "$(echo $missing) missing and no apt-get here; install ${PACKAGES[*]} yourself"
  say "installing ${PACKAGES[*]} (apt-get) ..."
  local started=$SECONDS guard=""
  # Packages must not start system services (there may be no systemd, and we run our own daemons):
  # policy-rc.d exit 101 tells invoke-rc.d "not now". Only added if absent, removed after.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$guard" && chmod 755 "$guard"
  fi
  local status=0
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 || {
    apt-get update -q >>"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1
  } || status=$?
  [[ -n $guard ]] && rm -f "$guard"
  ((status == 0)) || cannot_install "apt-get install ${PACKAGES[*]} failed (exit $status); see ${TMPDIR:-/tmp}/local-slurm-apt.log"
  say "installed in $((SECONDS - started)) s"
}

# -- configuration -------------------------------------------------------------------------------

write_configs() {
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd" "$ROOT/munge" "$RUN/munge"
  chmod 700 "$ROOT/munge"  # munged refuses a key directory others can read
  chmod 755 "$RUN/munge"   # ... and a socket directory others cannot enter
  if [[ ! -s $ROOT/munge/munge.key ]]; then
    head -c 1024 /dev/urandom >"$ROOT/munge/munge.key"
    chmod 400 "$ROOT/munge/munge.key"
  fi
  if [[ ! -s $ETC/db.password ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$ETC/db.password")
  fi
  local cpus memory_mb
  cpus=$(nproc)
  memory_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/local-slurm.sh; rewritten by every \`up\`.
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
MailProg=/bin/true
ReturnToService=2
KillWait=10
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  (umask 077 && cat >"$ETC/slurmdbd.conf" <<EOF
# Written by scripts/local-slurm.sh. Must sit beside slurm.conf, mode 600.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.password")
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
  )
  chmod 600 "$ETC/slurmdbd.conf"
}

# -- daemons -------------------------------------------------------------------------------------

running() {  # running NAME: its pid file names a live process
  local pidfile=$RUN/$1.pid
  [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# Daemons run detached from our terminal and pipes (a CI runner waits for its pipes to close).
detach() { setsid "$@" </dev/null >>"$LOG/daemons.out" 2>&1 & }

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND until it succeeds or the start timeout
  local what=$1 deadline=$((SECONDS + START_TIMEOUT_S))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up within ${START_TIMEOUT_S} s; see $LOG/"
    sleep 0.3
  done
}

start_munge() {
  running munged && return
  detach munged --foreground --force --key-file="$ROOT/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$ROOT/munge/munge.seed"
  wait_for "munged" munge --socket="$MUNGE_SOCKET" -n
}

sql() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root "$@"; }

start_mariadb() {
  running mariadbd && return
  if [[ ! -d $ROOT/mysql/mysql ]]; then
    mkdir -p "$ROOT/mysql"
    mariadb-install-db --no-defaults --datadir="$ROOT/mysql" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed; see $LOG/mariadb-install.log"
  fi
  detach mariadbd --no-defaults --datadir="$ROOT/mysql" --user=root --socket="$MYSQL_SOCKET" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
    --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=64M
  wait_for "mariadbd" sql -e "select 1"
  local password
  password=$(cat "$ETC/db.password")
  sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
          ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
  running slurmdbd && return
  detach slurmdbd -D
  wait_for "slurmdbd" sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  running slurmctld || detach slurmctld -D
  wait_for "slurmctld" scontrol ping
  running slurmd || detach slurmd -D -N localhost
  wait_for "the node" node_idle
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null; }
node_idle() { [[ $(node_state) == idle* || $(node_state) == mixed* || $(node_state) == allocated* ]]; }

up() {
  [[ $(id -u) == 0 ]] || cannot_install "needs root (slurmd starts jobs as their users; apt-get installs)"
  install_packages
  if running munged && running mariadbd && running slurmdbd && running slurmctld && running slurmd \
    && node_idle; then
    say "already up (SLURM_CONF=$SLURM_CONF)"
    return
  fi
  local started=$SECONDS
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  # A node left DOWN or DRAINED by an earlier unclean stop is put back in service.
  scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
  say "up in $((SECONDS - started)) s: cluster $CLUSTER, $(nproc) CPUs, partition debug"
  say "point SLURM commands at it with: export SLURM_CONF=$SLURM_CONF"
}

stop() {  # stop NAME: TERM, then KILL after 15 s
  local pidfile=$RUN/$1.pid pid
  running "$1" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

down() {
  if running slurmctld; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  local daemon
  for daemon in slurmd slurmctld slurmdbd mariadbd munged; do stop "$daemon"; done
  say "down (files kept in $ROOT)"
}

status() {
  if running slurmctld && running slurmd && node_idle; then
    say "up: node localhost $(node_state); SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  say "not running (root $ROOT)"
  return 1
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac

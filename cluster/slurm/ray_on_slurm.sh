# shellcheck shell=bash
# Ray on a Slurm allocation, sourced by train.sbatch and sweep.sbatch (not run on its own).
#
# What it does, in order (digan_setup -> digan_ray_up -> digan_run_driver; digan_teardown on EXIT):
#   1. reads the allocation: node list, CPUs and GPUs per node (SLURM_* variables);
#   2. writes a fresh per-job Ray auth token to a 0600 file and points every Ray process at it
#      (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH); the token is never printed or put on a command line;
#   3. starts the Ray head on the first node and one Ray worker per remaining node, each a background
#      `srun --overlap ... ray start --block` step, and waits until every node has started and joined;
#   4. runs the driver (`python -m digan.train ...`) in the batch step with RAY_ADDRESS set to the head;
#   5. preemption: Slurm sends DIGAN_PREEMPT_SIGNAL (USR1) to this batch shell before the time limit
#      (`#SBATCH --signal=B:USR1@<secs>`); the handler forwards DIGAN_DRIVER_SIGNAL to the driver, waits
#      for it to checkpoint and exit, tears Ray down and `scontrol requeue`s the job. The requeued job
#      (same job id, SLURM_RESTART_COUNT+1) re-runs the same command, and the same train.run_name resumes;
#   6. teardown (EXIT trap): stops the driver if it still runs, ends the Ray steps by PID, runs `ray stop`
#      on every node when the nodes are exclusive, removes the token and the per-job Ray temp dirs.
#
# Variables (all optional; defaults in brackets):
#   DIGAN_ROOT             repo checkout to run from, must be on a shared filesystem [$SLURM_SUBMIT_DIR]
#   DIGAN_VENV             virtualenv to activate on every node [none: python/ray from PATH]
#   DIGAN_LOG_DIR          per-job logs go to $DIGAN_LOG_DIR/<job name>-<job id>/ [$DIGAN_ROOT/logs]
#   DIGAN_LOOPBACK         1 = test mode on one machine: the head address and the dashboard on 127.0.0.1,
#                          auth off unless DIGAN_RAY_AUTH says otherwise, no node-wide `ray stop` [0].
#                          (Ray 2.60 has no bind option for its GCS/raylet ports, which listen on all
#                          interfaces, and it advertises the host's primary address instead of 127.0.0.1.)
#   DIGAN_RAY_AUTH         token | disabled [token; disabled when DIGAN_LOOPBACK=1]
#   DIGAN_RAY_TOKEN_DIR    0700 directory for the per-job token file, shared by all nodes [$HOME/.digan/ray-tokens]
#   DIGAN_RAY_HEAD_IP      address the head advertises [first address of `hostname --ip-address`]
#   DIGAN_RAY_PORT         GCS port of the head [6379]
#   DIGAN_RAY_DASHBOARD_PORT  dashboard / job-submission port [8265]
#   DIGAN_RAY_PORT_BASE    if set, every Ray port is derived from it (GCS = base, dashboard = base+1, ...,
#                          workers base+100..base+999): use it when Ray clusters can share a node [unset]
#   DIGAN_RAY_TMPDIR       Ray's temp/session dir on every node, short (unix socket paths <= 107 bytes)
#                          [/tmp/ray-$SLURM_JOB_ID]
#   DIGAN_RAY_START_TIMEOUT_S  seconds to wait for each Ray node to start [180]
#   DIGAN_RAY_START_ATTEMPTS   tries per node when `ray start` dies during startup [3]
#   DIGAN_RAY_STOP         1 = node-wide `ray stop` at teardown (safe only with --exclusive nodes) [1; 0 in loopback]
#   DIGAN_PREEMPT_SIGNAL   signal Slurm sends before the time limit, as in `--signal=B:<SIG>@secs` [USR1]
#   DIGAN_DRIVER_SIGNAL    signal forwarded to the driver to make it checkpoint and stop [TERM]
#   DIGAN_REQUEUE          1 = requeue the job after a preemption checkpoint [1]

digan_log() { echo "[digan-slurm $(date +%H:%M:%S)] $*"; }
digan_die() { digan_log "error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------
# 1. The allocation and the settings.

digan_setup() {
  : "${SLURM_JOB_ID:?digan: run this inside a Slurm job (sbatch cluster/slurm/....sbatch)}"
  DIGAN_ROOT=${DIGAN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$DIGAN_ROOT" || digan_die "DIGAN_ROOT=$DIGAN_ROOT: no such directory"
  if [ -n "${DIGAN_VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$DIGAN_VENV/bin/activate" || digan_die "DIGAN_VENV=$DIGAN_VENV: cannot activate"
  fi
  command -v ray >/dev/null || digan_die "no 'ray' on PATH: set DIGAN_VENV or load your environment"

  DIGAN_LOOPBACK=${DIGAN_LOOPBACK:-0}
  if [ "$DIGAN_LOOPBACK" = 1 ]; then
    DIGAN_RAY_AUTH=${DIGAN_RAY_AUTH:-disabled}
    DIGAN_RAY_STOP=${DIGAN_RAY_STOP:-0}
  else
    DIGAN_RAY_AUTH=${DIGAN_RAY_AUTH:-token}
    DIGAN_RAY_STOP=${DIGAN_RAY_STOP:-1}
  fi
  DIGAN_PREEMPT_SIGNAL=${DIGAN_PREEMPT_SIGNAL:-USR1}
  DIGAN_DRIVER_SIGNAL=${DIGAN_DRIVER_SIGNAL:-TERM}
  DIGAN_REQUEUE=${DIGAN_REQUEUE:-1}
  DIGAN_RAY_START_TIMEOUT_S=${DIGAN_RAY_START_TIMEOUT_S:-180}
  DIGAN_RAY_START_ATTEMPTS=${DIGAN_RAY_START_ATTEMPTS:-3}

  DIGAN_JOB_LOG_DIR=${DIGAN_LOG_DIR:-$DIGAN_ROOT/logs}/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID
  mkdir -p "$DIGAN_JOB_LOG_DIR"
  # Ray falls back to TMPDIR, which sites often set to a long per-job path; Ray's unix sockets then
  # exceed 107 bytes. RAY_TMPDIR wins over TMPDIR and reaches every srun step through the environment.
  # Only the default per-job dir is removed at teardown; a dir the user names is left alone.
  DIGAN_RM_RAY_TMPDIR=0
  [ -n "${DIGAN_RAY_TMPDIR:-}" ] || DIGAN_RM_RAY_TMPDIR=1
  export RAY_TMPDIR=${DIGAN_RAY_TMPDIR:-/tmp/ray-$SLURM_JOB_ID}
  export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
  # Logs in real time (the startup wait below reads them), not in 8 KiB blocks.
  export PYTHONUNBUFFERED=1

  mapfile -t DIGAN_NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
  DIGAN_NUM_NODES=${#DIGAN_NODES[@]}
  DIGAN_CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:?}}
  # GPUs per node: --gpus-per-task (one task per node) or --gpus-per-node / --gres; "a100:8" -> 8.
  local g=${SLURM_GPUS_PER_TASK:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}}
  DIGAN_GPUS_PER_NODE=${g##*:}
  [[ $DIGAN_GPUS_PER_NODE =~ ^[0-9]+$ ]] || digan_die "cannot read GPUs per node from '$g'"

  # Ports: Ray's defaults unless a base is given; with a base, distinct clusters on one node never collide.
  DIGAN_RAY_PORT_ARGS=()
  if [ -n "${DIGAN_RAY_PORT_BASE:-}" ]; then
    local b=$DIGAN_RAY_PORT_BASE
    DIGAN_RAY_PORT=$b
    DIGAN_RAY_DASHBOARD_PORT=$((b + 1))
    DIGAN_RAY_PORT_ARGS=(--node-manager-port=$((b + 2)) --object-manager-port=$((b + 3))
      --ray-client-server-port=$((b + 4)) --dashboard-agent-grpc-port=$((b + 5))
      --dashboard-agent-listen-port=$((b + 6)) --metrics-export-port=$((b + 7))
      --runtime-env-agent-port=$((b + 8)) --min-worker-port=$((b + 100)) --max-worker-port=$((b + 999)))
  fi
  DIGAN_RAY_PORT=${DIGAN_RAY_PORT:-6379}
  DIGAN_RAY_DASHBOARD_PORT=${DIGAN_RAY_DASHBOARD_PORT:-8265}

  if [ "$DIGAN_LOOPBACK" = 1 ]; then
    DIGAN_RAY_HEAD_IP=127.0.0.1
    DIGAN_DASHBOARD_HOST=127.0.0.1
  else
    if [ -z "${DIGAN_RAY_HEAD_IP:-}" ]; then
      # The batch step runs on the first node of the allocation, which hosts the head.
      read -r DIGAN_RAY_HEAD_IP _ < <(hostname --ip-address)
      case $DIGAN_RAY_HEAD_IP in
        127.*) read -r DIGAN_RAY_HEAD_IP _ < <(hostname -I) ;;  # Debian maps the hostname to 127.0.1.1
      esac
    fi
    DIGAN_DASHBOARD_HOST=0.0.0.0  # reachable for `ray job submit` and the UI; guarded by the token
  fi
  export RAY_ADDRESS=$DIGAN_RAY_HEAD_IP:$DIGAN_RAY_PORT
  DIGAN_STEP_PIDS=()
  DIGAN_STEP_LOGS=()
  DIGAN_STEP_OFFSETS=()
  DIGAN_DRIVER_PID=
  DIGAN_PREEMPTED=0
  DIGAN_TERMINATED=0
  DIGAN_TOKEN_FILE=
  trap digan_teardown EXIT
  # From here on the preemption signal must not kill this shell (its default action): it may come while
  # Ray is still starting, before there is a driver to forward it to.
  trap _digan_on_preempt "$DIGAN_PREEMPT_SIGNAL"
  trap _digan_on_term TERM

  digan_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${DIGAN_NODES[*]}:" \
    "$DIGAN_CPUS_PER_NODE CPUs, $DIGAN_GPUS_PER_NODE GPUs per node; head $RAY_ADDRESS;" \
    "auth $DIGAN_RAY_AUTH; logs in $DIGAN_JOB_LOG_DIR"
}

# ---------------------------------------------------------------------------------------------------
# 2. The per-job token.

digan_auth_setup() {
  # A token in the environment would win over the file and is readable from /proc/<pid>/environ.
  unset RAY_AUTH_TOKEN
  if [ "$DIGAN_RAY_AUTH" = disabled ]; then
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
    return
  fi
  [ "$DIGAN_RAY_AUTH" = token ] || digan_die "DIGAN_RAY_AUTH=$DIGAN_RAY_AUTH: choose token or disabled"
  local dir=${DIGAN_RAY_TOKEN_DIR:-$HOME/.digan/ray-tokens}
  { (umask 077 && mkdir -p "$dir") && chmod 700 "$dir"; } || digan_die "cannot create token dir $dir"
  DIGAN_TOKEN_FILE=$dir/job-$SLURM_JOB_ID.token
  # 256 random bits as hex, like `ray get-auth-token --generate`; written under umask 077 so the file
  # is 0600 from its first byte, never echoed.
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$DIGAN_TOKEN_FILE") ||
    digan_die "cannot write the token file"
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIGAN_TOKEN_FILE
}

# ---------------------------------------------------------------------------------------------------
# 3. Head and workers.

_digan_size() { if [ -f "$1" ]; then wc -c <"$1"; else echo 0; fi; }

_digan_launch_node() {  # i: `ray start --block` for node i (0 = the head) as a background srun step
  local i=$1 log args
  if [ "$i" -eq 0 ]; then
    log=$DIGAN_JOB_LOG_DIR/ray-head.log
    args=(--head --node-ip-address="$DIGAN_RAY_HEAD_IP" --port="$DIGAN_RAY_PORT"
      --dashboard-host="$DIGAN_DASHBOARD_HOST" --dashboard-port="$DIGAN_RAY_DASHBOARD_PORT")
  else
    log=$DIGAN_JOB_LOG_DIR/ray-worker-${DIGAN_NODES[i]}.log
    args=(--address="$RAY_ADDRESS")
  fi
  DIGAN_STEP_LOGS[i]=$log
  DIGAN_STEP_OFFSETS[i]=$(_digan_size "$log")
  # --overlap: these steps run for the whole job; without it they would hold the node's CPUs and any
  # later srun on the node would wait for them forever. --open-mode=append keeps the logs of requeues.
  srun --overlap --nodes=1 --ntasks=1 -w "${DIGAN_NODES[i]}" --open-mode=append --output="$log" \
    ray start "${args[@]}" --block --num-cpus="$DIGAN_CPUS_PER_NODE" --num-gpus="$DIGAN_GPUS_PER_NODE" \
    --disable-usage-stats "${DIGAN_RAY_PORT_ARGS[@]}" &
  DIGAN_STEP_PIDS[i]=$!
}

_digan_wait_node() {  # i: until node i's `ray start` reports the node up; start it again if it died starting
  local i=$1 attempt=1 t_end=$((SECONDS + DIGAN_RAY_START_TIMEOUT_S))
  # `ray start` prints this once its raylet has registered with the GCS (on the head: GCS, dashboard and
  # raylet up). Only what this attempt appended counts: the logs are kept across requeues.
  until tail -c +"$((DIGAN_STEP_OFFSETS[i] + 1))" "${DIGAN_STEP_LOGS[i]}" 2>/dev/null |
    grep -q "Ray runtime started"; do
    if ! kill -0 "${DIGAN_STEP_PIDS[i]}" 2>/dev/null; then
      wait "${DIGAN_STEP_PIDS[i]}" || true
      # Ray gives a raylet 30 s to register (hard-coded); an overloaded node can miss that once.
      [ "$attempt" -lt "$DIGAN_RAY_START_ATTEMPTS" ] ||
        digan_die "Ray on ${DIGAN_NODES[i]} failed to start $attempt times; see ${DIGAN_STEP_LOGS[i]}"
      attempt=$((attempt + 1))
      digan_log "Ray on ${DIGAN_NODES[i]} exited during startup; starting it again (attempt $attempt)"
      _digan_launch_node "$i"
    fi
    [ $SECONDS -lt "$t_end" ] ||
      digan_die "Ray on ${DIGAN_NODES[i]} did not start in $DIGAN_RAY_START_TIMEOUT_S s; see ${DIGAN_STEP_LOGS[i]}"
    sleep 0.5
  done
}

digan_ray_up() {
  digan_auth_setup
  local t0=$SECONDS i
  _digan_launch_node 0
  _digan_wait_node 0
  # Workers join the head; all of them must be up before the driver starts, or Ray Train would size
  # itself to the nodes that came first.
  for ((i = 1; i < DIGAN_NUM_NODES; i++)); do _digan_launch_node "$i"; done
  for ((i = 1; i < DIGAN_NUM_NODES; i++)); do _digan_wait_node "$i"; done
  digan_log "Ray up in $((SECONDS - t0)) s: $DIGAN_NUM_NODES node(s);" \
    "dashboard http://$DIGAN_RAY_HEAD_IP:$DIGAN_RAY_DASHBOARD_PORT"
}

# ---------------------------------------------------------------------------------------------------
# 4-5. The driver, signals and requeue.

_digan_on_preempt() {
  DIGAN_PREEMPTED=1
  digan_log "got SIG$DIGAN_PREEMPT_SIGNAL (time limit near / preemption): asking the driver to checkpoint and stop"
  _digan_signal_driver
}

_digan_signal_driver() {
  if [ -n "$DIGAN_DRIVER_PID" ]; then
    kill -s "$DIGAN_DRIVER_SIGNAL" "$DIGAN_DRIVER_PID" 2>/dev/null || true
  fi
}

_digan_on_term() {
  # scancel, the hard time limit, a node shutdown: Slurm has sent SIGTERM to every process of the job,
  # the driver included (it checkpoints at its next step if KillWait leaves time). Forwarding it again
  # would be a second signal, which makes digan.train abort without a checkpoint. No requeue here:
  # Slurm's own preemption with PreemptMode=REQUEUE requeues by itself.
  digan_log "got SIGTERM: the job is being terminated, no requeue"
  DIGAN_TERMINATED=1
}

digan_run_driver() {
  local rc=0
  if [ "$DIGAN_TERMINATED" = 1 ]; then
    return 143
  elif [ "$DIGAN_PREEMPTED" = 1 ]; then
    digan_log "preempted before the driver started: nothing to checkpoint"
  else
    digan_log "driver: $*"
    "$@" &
    DIGAN_DRIVER_PID=$!
    # `wait` returns early (status > 128) whenever a trapped signal arrives, and the driver may exit
    # (and be reaped) while the trap runs: keep waiting until it is gone, then ask once more. bash keeps
    # a reaped child's status, so that last `wait` returns the driver's own status, never the
    # interrupted wait's 128 + signal.
    while kill -0 "$DIGAN_DRIVER_PID" 2>/dev/null; do
      rc=0
      wait "$DIGAN_DRIVER_PID" || rc=$?
      [ "$rc" -ne 127 ] || break  # not our child (any more): never spin on a reused pid
    done
    rc=0
    wait "$DIGAN_DRIVER_PID" || rc=$?
    DIGAN_DRIVER_PID=
    digan_log "driver exited with $rc"
  fi

  if [ "$DIGAN_PREEMPTED" = 1 ] && [ "$DIGAN_TERMINATED" = 0 ] && [ "$DIGAN_REQUEUE" = 1 ]; then
    if [ "$rc" -ne 0 ]; then
      digan_log "not requeueing: the driver failed ($rc) after the preemption signal"
      return "$rc"
    fi
    # Stop Ray before the requeue: requeue kills this job's processes, and the next run starts a new cluster.
    digan_teardown_ray
    digan_log "requeueing job $SLURM_JOB_ID; the same run name resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || { digan_log "scontrol requeue failed"; return 1; }
    return 0
  fi
  return "$rc"
}

# ---------------------------------------------------------------------------------------------------
# 6. Teardown.

digan_teardown_ray() {
  [ ${#DIGAN_STEP_PIDS[@]} -gt 0 ] || return 0
  local pid t_end
  # SIGTERM to an srun client makes Slurm end its step on every node: `ray start --block` and all the
  # Ray processes below it (linuxproc tracks them by parentage). Not a graceful Ray drain: by now the
  # driver has exited and its checkpoint is in storage, and a drain only waits for tasks that are gone
  # (signalled together with the GCS, the raylet's drain request even times out after 30 s).
  local t0=$SECONDS
  for pid in "${DIGAN_STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  t_end=$((SECONDS + ${DIGAN_RAY_STOP_TIMEOUT_S:-60}))
  for pid in "${DIGAN_STEP_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $t_end ]; do sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  digan_log "Ray steps ended in $((SECONDS - t0)) s"
  DIGAN_STEP_PIDS=()
  if [ "$DIGAN_RAY_STOP" = 1 ]; then
    # A sweep for strays (processes that left their step's process tree) on every node of the job.
    # `ray stop` ends every Ray process this user owns on a node, so only with --exclusive nodes.
    timeout 120 srun --overlap --nodes="$DIGAN_NUM_NODES" --ntasks-per-node=1 ray stop >/dev/null 2>&1 || true
  fi
  digan_log "Ray stopped"
}

digan_teardown() {
  local rc=$?
  trap - EXIT TERM "$DIGAN_PREEMPT_SIGNAL"
  if [ -n "${DIGAN_DRIVER_PID:-}" ] && kill -0 "$DIGAN_DRIVER_PID" 2>/dev/null; then
    kill -s "$DIGAN_DRIVER_SIGNAL" "$DIGAN_DRIVER_PID" 2>/dev/null || true
    wait "$DIGAN_DRIVER_PID" 2>/dev/null || true
  fi
  digan_teardown_ray
  if [ -n "${DIGAN_TOKEN_FILE:-}" ]; then rm -f "$DIGAN_TOKEN_FILE"; fi
  if [ "${DIGAN_RM_RAY_TMPDIR:-0}" = 1 ]; then
    rm -rf "${RAY_TMPDIR:?}"
    if [ "${DIGAN_NUM_NODES:-1}" -gt 1 ]; then
      timeout 60 srun --overlap --nodes="$DIGAN_NUM_NODES" --ntasks-per-node=1 rm -rf "$RAY_TMPDIR" >/dev/null 2>&1 ||
        true
    fi
  fi
  exit "$rc"
}

"""Start `dba-train` on one machine, several local processes, CUDA hosts, or every worker of a Cloud TPU VM.

  python -m dba_jax.launch local [--processes N] [--devices-per-process D] [--dry-run] -- DBA_TRAIN_ARGS
  python -m dba_jax.launch cuda --hosts h0,h1 [--repo DIR] [--dry-run] -- DBA_TRAIN_ARGS
  python -m dba_jax.launch tpu --name NAME --zone ZONE [--project P] [--repo DIR] [--dry-run] -- DBA_TRAIN_ARGS

Multi-process runs use JAX's own distributed runtime: process 0's host is the coordinator and every process
gets DBA_COORDINATOR_ADDRESS / DBA_NUM_PROCESSES / DBA_PROCESS_ID. Only the standard library is used here, so
`--dry-run` works before anything is installed. The shell scripts in launch/ wrap this module.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

# Latency-hiding scheduling overlaps collectives with compute on multi-GPU runs (JAX GPU performance tips).
CUDA_XLA_FLAGS = "--xla_gpu_enable_latency_hiding_scheduler=true"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def local_commands(args, train_args) -> list[tuple[dict, list[str]]]:
  """(extra environment, argv) for each local process."""
  train = [args.python, "-m", "dba_jax.main", *train_args]
  if args.processes == 1:
    return [({}, train)]
  port = args.port or free_port()
  cmds = []
  for i in range(args.processes):
    env = {"DBA_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "DBA_NUM_PROCESSES": str(args.processes),
           "DBA_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}"}
    cmds.append((env, train))
  return cmds


def cuda_commands(args, train_args) -> list[list[str]]:
  hosts = [h for h in args.hosts.split(",") if h]
  port = args.port or 8476
  out = []
  for i, host in enumerate(hosts):
    env = {"XLA_FLAGS": CUDA_XLA_FLAGS, "EXTRAS": "cuda"}
    if len(hosts) > 1:
      env.update(DBA_COORDINATOR_ADDRESS=f"{hosts[0]}:{port}", DBA_NUM_PROCESSES=str(len(hosts)),
                 DBA_PROCESS_ID=str(i))
    remote = " ".join([f"cd {shlex.quote(args.repo)} &&", *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                       "./launch/local.sh", *map(shlex.quote, train_args)])
    local = len(hosts) == 1 and host in ("localhost", "127.0.0.1", socket.gethostname())
    out.append(["bash", "-c", remote] if local else ["ssh", host, remote])
  return out


def tpu_command(args, train_args) -> list[str]:
  remote = " ".join([f"cd {shlex.quote(args.repo)} && EXTRAS=tpu ./launch/local.sh --distributed",
                     *map(shlex.quote, train_args)])
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}", "--worker=all",
         f"--command={remote}"]
  return cmd + ([f"--project={args.project}"] if args.project else [])


def show(env: dict, argv: list[str]) -> str:
  return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def run_all(cmds: list[tuple[dict, list[str]]]) -> int:
  """Start every process, forward SIGTERM/SIGINT to all, return the first non-zero exit code (else 0)."""
  procs = [subprocess.Popen(argv, env={**os.environ, **env}) for env, argv in cmds]

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  code = 0
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.poll() not in (None, 0)]
    if failed and not code:  # one process died: the others would hang in collectives
      code = failed[0].returncode
      for p in procs:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.2)
  return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="dba_jax.launch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="mode", required=True)
  loc = sub.add_parser("local", help="this machine: one process, or N CPU processes over loopback")
  loc.add_argument("--processes", type=int, default=1)
  loc.add_argument("--devices-per-process", type=int, default=1)
  loc.add_argument("--python", default=sys.executable, help="interpreter that runs dba_jax.main")
  cuda = sub.add_parser("cuda", help="one process per CUDA host, over ssh (a single host runs locally)")
  cuda.add_argument("--hosts", required=True, help="comma-separated; the first is the coordinator")
  tpu = sub.add_parser("tpu", help="every worker of a Cloud TPU VM slice, via gcloud")
  tpu.add_argument("--name", required=True)
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--project", default="")
  for q in (loc, cuda, tpu):
    q.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    q.add_argument("--port", type=int, default=0, help="coordinator port (default: free port / 8476)")
  for q in (cuda, tpu):
    q.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the dba_jax checkout on the remote machines (default: this path)")
  args = p.parse_args(own)
  if args.mode == "local":
    cmds = local_commands(args, train_args)
  elif args.mode == "cuda":
    cmds = [({}, c) for c in cuda_commands(args, train_args)]
  else:
    cmds = [({}, tpu_command(args, train_args))]
  if args.dry_run:
    print("\n".join(show(env, c) for env, c in cmds))
    return 0
  if len(cmds) == 1:
    env, c = cmds[0]
    os.environ.update(env)
    os.execvp(c[0], c)
  return run_all(cmds)


if __name__ == "__main__":
  sys.exit(main())

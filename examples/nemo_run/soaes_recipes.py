"""The megatron-soaes phases as a NeMo-Run experiment, local or on SLURM.

    pip install nemo-run==0.11.1 leptonai==0.27.3      # (requirements/launch.txt)
    python examples/nemo_run/soaes_recipes.py --executor local --dryrun                  # tiny example
    python examples/nemo_run/soaes_recipes.py --executor slurm --account A --partition P --dryrun   # 7B/72B

Each task is the same `soaes` command the sbatch scripts run; the experiment runs them in order,
each starting when the previous one succeeded (`sequential=True`), so re-launching after a failure
resumes the failed phase from its last checkpoint.
"""

from __future__ import annotations

import argparse

import nemo_run as run

TINY = [  # (name, command, GPUs per node, nodes)
    ("data", "soaes prepare-demo-data --out data/demo", 0, 1),
    ("pipeline", "soaes pipeline --config examples/tiny/pipeline.yaml", 0, 1),
]
REAL = [
    ("cpt-7b", "soaes train --config examples/slurm/configs/cpt_7b.yaml", 8, 2),
    ("cpt-72b", "soaes train --config examples/slurm/configs/cpt_72b.yaml", 8, 8),
    ("sft-7b", "soaes sft --recipe examples/slurm/configs/sft_7b.yaml", 8, 1),
    ("sft-72b", "soaes sft --recipe examples/slurm/configs/sft_72b.yaml", 8, 4),
    ("distill", "soaes distill --config examples/slurm/configs/distill_72b_7b.yaml", 8, 2),
]


def local_executor(gpus: int) -> run.LocalExecutor:
    if gpus:  # one process per GPU under torchrun
        return run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun")
    return run.LocalExecutor()


def slurm_executor(args, nodes: int, gpus: int) -> run.SlurmExecutor:
    return run.SlurmExecutor(account=args.account, partition=args.partition, nodes=nodes, ntasks_per_node=gpus,
                             gpus_per_node=gpus, time=args.time, container_image=args.container,
                             tunnel=run.LocalTunnel(job_dir=args.job_dir),
                             env_vars={"CUDA_DEVICE_MAX_CONNECTIONS": "1"})


def add_phases(exp: run.Experiment, args) -> None:
    phases = TINY if args.executor == "local" and not args.real else REAL
    for name, cmd, gpus, nodes in phases:
        ex = local_executor(gpus) if args.executor == "local" else slurm_executor(args, nodes, gpus)
        exp.add(run.Script(inline=cmd), executor=ex, name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--real", action="store_true", help="the 7B/72B phases even with the local executor")
    ap.add_argument("--account", default="my_account")
    ap.add_argument("--partition", default="batch")
    ap.add_argument("--time", default="48:00:00")
    ap.add_argument("--container", default=None)
    ap.add_argument("--job-dir", default="nemo_run_jobs")
    ap.add_argument("--dryrun", action="store_true")
    args = ap.parse_args()
    real = args.executor == "slurm" or args.real
    with run.Experiment(f"soaes-{'real' if real else 'tiny'}", executor=local_executor(0)) as exp:
        add_phases(exp, args)
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(sequential=True)


if __name__ == "__main__":
    main()

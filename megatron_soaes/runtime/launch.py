"""Re-exec the current command under torchrun when it needs more processes than it has."""

from __future__ import annotations

import os
import sys

from megatron_soaes.runtime.distributed import _free_port


def ensure_world_size(nproc: int) -> None:
    """If not already inside a launcher and `nproc` > 1, replace this process by
    ``torchrun --nproc-per-node nproc <same command>`` (single node; use srun/torchrun on clusters)."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:
        return
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *sys.argv]
    sys.stdout.flush()
    os.execv(sys.executable, args)

"""SLURM launchers and NeMo-Run recipes: the 7B/72B configs validate against their sbatch world sizes."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import cli_in_process as soaes  # dry runs only read configs

SLURM = ROOT / "examples" / "slurm"


def sbatch_world(script):
    text = (SLURM / script).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    per = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1))
    return nodes * per


@pytest.mark.parametrize("script,config", [("cpt_qwen2.5_7b.sbatch", "cpt_7b.yaml"), ("cpt_qwen2.5_72b.sbatch", "cpt_72b.yaml"),
                                           ("distill_72b_to_7b.sbatch", "distill_72b_7b.yaml"),
                                           ("cpt_qwen3_8b.sbatch", "cpt_qwen3_8b.yaml"),
                                           ("cpt_llama3.1_8b.sbatch", "cpt_llama3.1_8b.yaml"),
                                           ("cpt_qwen3_30b_a3b.sbatch", "cpt_qwen3_30b_a3b.yaml"),
                                           ("cpt_qwen3_235b_a22b.sbatch", "cpt_qwen3_235b_a22b.yaml"),
                                           ("cpt_qwen2.5_7b_32k.sbatch", "cpt_7b_32k.yaml"),
                                           ("cpt_qwen2.5_72b_128k.sbatch", "cpt_72b_128k.yaml")])
def test_training_configs_fit_their_sbatch_layout(script, config):
    world = sbatch_world(script)
    res = soaes("train", "--config", str(SLURM / "configs" / config), "--dry-run", "--world-size", str(world),
                "--skip-path-check")
    assert res.returncode == 0 and "config OK" in res.stdout, res.stderr
    bad = soaes("train", "--config", str(SLURM / "configs" / config), "--dry-run", "--world-size", str(world + 8),
                "--skip-path-check")
    assert bad.returncode == 2 and "not divisible" in bad.stderr


@pytest.mark.parametrize("script,recipe", [("sft_stage_7b.sbatch", "sft_7b.yaml"), ("sft_stage_72b.sbatch", "sft_72b.yaml"),
                                           ("sft_qwen3_30b_a3b.sbatch", "sft_qwen3_30b_a3b.yaml")])
def test_sft_recipes_fit_their_sbatch_layout(script, recipe):
    res = soaes("sft", "--recipe", str(SLURM / "configs" / recipe), "--dry-run", "--world-size", str(sbatch_world(script)))
    assert res.returncode == 0 and res.stdout.count(": OK for world size") == 3, res.stderr


def test_shell_scripts_parse():
    for f in [*SLURM.glob("*.sbatch"), SLURM / "common.sh", SLURM / "pipeline_72b" / "submit.sh"]:
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0, f
    assert "--dependency=afterok" in (SLURM / "pipeline_72b" / "submit.sh").read_text()


def test_nemo_run_recipes_dryrun():
    pytest.importorskip("nemo_run", reason="optional: pip install -r requirements/launch.txt")
    res = subprocess.run([sys.executable, str(ROOT / "examples/nemo_run/soaes_recipes.py"), "--executor", "local",
                          "--dryrun"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("config", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*/*.yaml")
                                          if "kind:" in p.read_text()))
def test_example_job_configs_validate(config):
    """Every example job config (tiny, spec pair, GPU) is a valid job for one process."""
    res = soaes("train", "--config", config, "--dry-run", "--world-size", "1", "--skip-path-check")
    assert res.returncode == 0 and "config OK" in res.stdout, res.stderr


def test_speculative_72b_tp8_script_layout():
    """The TP-8 speculative benchmark script's layout: Qwen2.5-72B split 8 ways with the 7B draft replicated."""
    tp = sbatch_world("spec_decode_72b_tp8.sbatch")
    bench = [sys.executable, str(ROOT / "benchmarks" / "spec_decode.py"), "--dry-run", "--draft", "qwen2.5-7b"]
    ok = subprocess.run(bench + ["--target", "qwen2.5-72b", "--tp", str(tp)], capture_output=True, text=True, cwd=ROOT)
    assert tp == 8 and ok.returncode == 0 and "18.2 GB per rank at TP 8" in ok.stdout, ok.stderr
    bad = subprocess.run(bench + ["--target", "qwen2.5-72b", "--tp", "3"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: tensor parallel 3 does not divide num_attention_heads 64"
    other = subprocess.run(bench + ["--target", "tiny", "--tp", "2"], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 1 and "differs from the target's" in other.stderr



@pytest.mark.parametrize("script", ["cpt_qwen2.5_7b.sbatch", "cpt_qwen2.5_72b.sbatch", "cpt_qwen3_8b.sbatch",
                                    "cpt_llama3.1_8b.sbatch", "distill_72b_to_7b.sbatch", "sft_stage_7b.sbatch",
                                    "sft_stage_72b.sbatch", "cpt_qwen3_30b_a3b.sbatch", "cpt_qwen3_235b_a22b.sbatch",
                                    "sft_qwen3_30b_a3b.sbatch"])
def test_training_sbatch_asks_for_sigterm_and_requeues(script):
    text = (SLURM / script).read_text()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --requeue" in text
    assert "launch_resumable soaes" in text and "\nlaunch soaes" not in text


@pytest.mark.parametrize("status,requeued,exit_code", [(75, True, 0), (1, False, 1), (0, False, 0)])
def test_launch_resumable_requeues_on_the_preempted_status(tmp_path, status, requeued, exit_code):
    """common.sh with stand-ins for srun and scontrol: the trainer's EXIT_PREEMPTED requeues the job."""
    import subprocess

    from megatron_soaes.training.preemption import EXIT_PREEMPTED

    assert EXIT_PREEMPTED == 75  # the number common.sh tests for
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text(f"#!/bin/bash\nexit {status}\n")
    (bin_ / "scontrol").write_text(f"#!/bin/bash\n[ \"$1\" = show ] && echo node1 && exit 0\necho \"$@\" >> {tmp_path}/calls\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "4242"}
    res = subprocess.run(["bash", "-c", f"source {SLURM / 'common.sh'}; launch_resumable soaes train --config x.yaml; "
                          "echo after"], env=env, capture_output=True, text=True)
    assert res.returncode == exit_code, res.stderr
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert ("requeue 4242" in calls) == requeued
    assert ("after" in res.stdout) == (status == 0)  # a failure or a requeue ends the script

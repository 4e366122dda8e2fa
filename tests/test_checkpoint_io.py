"""Checkpoint I/O: manifests that refuse corrupt checkpoints (resume falls back past them), asynchronous
saves that give the synchronous run's losses and survive kill -9 mid-write, and SIGTERM preemption."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, job_env
from test_cpt import losses, write_config


def _train(cfg, extra_env=None, sets=()):
    """`soaes train` in its own session, output to files: megatron-core's checkpoint writer starts a
    multiprocessing manager that can outlive a killed run and must not hold our pipes; the session is
    killed afterwards, as a scheduler would."""
    import signal
    import tempfile

    cmd = [sys.executable, "-m", "megatron_soaes.cli", "train", "--config", str(cfg)]
    for s in sets:
        cmd += ["--set", s]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env={**job_env(), **(extra_env or {})}, cwd=ROOT, stdout=out, stderr=err,
                             start_new_session=True)
        rc = p.wait(timeout=900)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def test_manifest_refuses_a_corrupt_file(tmp_path):
    """A manifest is written last; a truncated file, a flipped byte or a missing file is named."""
    from megatron_soaes.checkpoint.manifest import CheckpointCorrupt, verify, write_manifest

    d = tmp_path / "ck"
    d.mkdir()
    (d / "a.bin").write_bytes(os.urandom(1 << 20))
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"x" * 1000)
    m = write_manifest(d)
    assert set(m["files"]) == {"a.bin", "sub/b.bin"} and m["total_bytes"] == (1 << 20) + 1000
    assert verify(d)["files"] == m["files"]
    data = bytearray((d / "a.bin").read_bytes())
    data[12345] ^= 1
    (d / "a.bin").write_bytes(bytes(data))
    verify(d, checksums=False)  # same size: only the checksum sees it
    with pytest.raises(CheckpointCorrupt, match=r"a\.bin: checksum differs"):
        verify(d)
    (d / "sub" / "b.bin").write_bytes(b"x" * 999)
    with pytest.raises(CheckpointCorrupt, match=r"b\.bin: 999 bytes, the manifest says 1000"):
        verify(d, checksums=False)
    (d / "sub" / "b.bin").unlink()
    with pytest.raises(CheckpointCorrupt, match=r"b\.bin: missing"):
        verify(d, checksums=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_falls_back_past_a_corrupt_checkpoint(cpt_data, cpt_ref16, tmp_path, damage):
    """The newest checkpoint damaged on disk: resume refuses it (the log names the file), falls back to the
    previous one and reproduces the uninterrupted run's later losses bit for bit; loading it for weights
    and `soaes verify-checkpoint` refuse it with the file named."""
    ref, full = cpt_ref16
    run = tmp_path / "run"
    ck = run / "checkpoints"
    import shutil

    for it in ("iter_0000008", "iter_0000016"):
        shutil.copytree(ref / "checkpoints" / it, ck / it)
    (ck / "latest").write_text("iter_0000016")
    manifest = json.loads((ck / "iter_0000016" / "manifest.json").read_text())
    name = max((n for n in manifest["files"] if n.endswith(".distcp")), key=lambda n: manifest["files"][n]["bytes"])
    victim = ck / "iter_0000016" / name
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0x40
        victim.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "verify-checkpoint", str(ck / "iter_0000016")],
                         env=job_env(), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and name in res.stderr and res.stderr.count("\n") == 1, res.stderr
    res = _train(write_config(cpt_data, run, steps=16))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert f"refusing checkpoint iter_0000016: {victim}" in log and "resumed from" in log and "iter_0000008" in log
    assert len(list(ck.glob("iter_0000016.corrupt-*"))) == 1 and (ck / "latest").read_text() == "iter_0000016"
    got = losses(run)
    assert [got[s] for s in range(9, 17)] == [full[s] for s in range(9, 17)]
    res = subprocess.run([sys.executable, "-m", "megatron_soaes.cli", "verify-checkpoint", str(run)],
                         env=job_env(), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "match the manifest" in res.stdout, res.stdout + res.stderr


def test_async_save_losses_equal_sync_and_kill_in_flight_resumes(cpt_data, cpt_ref16, tmp_path):
    """train.async_save: the same losses as synchronous saves, bit for bit, and the same published
    checkpoints; kill -9 after a background save was scheduled but before it was published resumes
    from the previous complete checkpoint and reproduces the later losses."""
    sync, asy = cpt_ref16[0], tmp_path / "async"
    res = _train(write_config(cpt_data, asy, steps=16, async_save=True))
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(asy) == losses(sync)
    names = lambda d: sorted(p.name for p in (d / "checkpoints").iterdir())  # noqa: E731
    assert names(asy) == names(sync) == ["iter_0000008", "iter_0000016", "latest"]
    for it in ("iter_0000008", "iter_0000016"):
        m = lambda d: json.loads((d / "checkpoints" / it / "manifest.json").read_text())["tensors"]  # noqa: E731
        assert m(asy) == m(sync)
    blocked = [json.loads(x) for x in open(asy / "metrics.jsonl") if "save_blocked_s" in x]
    assert [r["step"] for r in blocked] == [8, 16]

    run = tmp_path / "killed"
    cfg = write_config(cpt_data, run, steps=16, async_save=True, save_interval=4)
    res = _train(cfg, {"SOAES_FAULT": "after_step:9"})  # step 8's save is scheduled, not yet published
    assert res.returncode == -9
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000004" and not (ck / "iter_0000008").exists()
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    full, got = losses(sync), losses(run)
    assert [got[s] for s in range(5, 17)] == [full[s] for s in range(5, 17)]


def test_sigterm_saves_and_exits_for_a_requeue(cpt_data, cpt_ref16, tmp_path):
    """SIGTERM mid-run (what SLURM sends before the time limit): the step finishes, a checkpoint at that
    step is published, the exit status is EXIT_PREEMPTED, and rerunning continues with the same losses."""
    from megatron_soaes.training.preemption import EXIT_PREEMPTED

    run = tmp_path / "run"
    cfg = write_config(cpt_data, run, steps=16)
    res = _train(cfg, {"SOAES_FAULT": "after_step:11:TERM"})
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    assert "preempted (SIGTERM)" in res.stderr and "iter_0000011" in res.stderr
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "iter_0000011"
    assert max(losses(run)) == 11
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    full, got = cpt_ref16[1], losses(run)
    assert [got[s] for s in range(1, 17)] == [full[s] for s in range(1, 17)]


def test_parallel_conversion_is_bit_exact_and_verified(hf_models, tmp_path):
    """Layers converted in parallel threads give the serial converter's tensors exactly, at TP 2, both
    ways; the converted checkpoint carries a manifest, and megatron -> HF refuses it once a file is cut."""
    from safetensors.torch import load_file

    from megatron_soaes.checkpoint.convert import ConversionError, hf_to_megatron, megatron_to_hf
    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.manifest import verify

    src = hf_models["untied"]
    for w in (1, 3):
        hf_to_megatron(src, tmp_path / f"mc{w}", tensor_parallel=2, progress=False, workers=w)
        megatron_to_hf(tmp_path / f"mc{w}", tmp_path / f"hf{w}", progress=False, workers=w, max_shard_bytes=1 << 16)
    a, b = DcpReader(tmp_path / "mc1"), DcpReader(tmp_path / "mc3")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(a.read(k).equal(b.read(k)) for k in a.keys())
    load = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
    x, y, ref = load(tmp_path / "hf1"), load(tmp_path / "hf3"), load(src)
    assert len(list((tmp_path / "hf3").glob("*.safetensors"))) > 1  # several shards written at once
    assert x.keys() == y.keys() == ref.keys() and all(x[k].equal(y[k]) and x[k].equal(ref[k]) for k in x)
    assert verify(tmp_path / "mc3") is not None
    victim = max((tmp_path / "mc3").glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ConversionError, match=victim.name):
        megatron_to_hf(tmp_path / "mc3", tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_checkpoint_without_manifest_is_refused_unless_allowed(hf_models, tmp_path):
    """A checkpoint without manifest.json (as megatron-core or Megatron-Bridge write them) is refused in one line
    by every command that reads one -- here megatron -> HF conversion and verify-checkpoint -- and read, with a
    warning, under --allow-unverified."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_models["tied"], tmp_path / "mc", progress=False)
    (tmp_path / "mc" / "manifest.json").unlink()
    cli = lambda *a: subprocess.run([sys.executable, "-m", "megatron_soaes.cli", *map(str, a)],  # noqa: E731
                                    env=job_env(), cwd=ROOT, capture_output=True, text=True)
    for args in (("convert", "megatron-to-hf", tmp_path / "mc", tmp_path / "hf"), ("verify-checkpoint", tmp_path / "mc")):
        p = cli(*args)
        assert p.returncode == 2 and "no manifest.json" in p.stderr and "--allow-unverified" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()
    p = cli("convert", "megatron-to-hf", tmp_path / "mc", tmp_path / "hf", "--allow-unverified")
    assert p.returncode == 0 and "WARNING" in p.stderr and "read unchecked" in p.stderr, p.stderr
    assert (tmp_path / "hf" / "config.json").exists()


def test_every_command_reads_a_checkpoint_path_in_every_form(cpt_ref16, tmp_path):
    """A run directory, its `checkpoints/`, `checkpoints/latest` and the iteration itself name the same
    checkpoint to megatron -> HF conversion and to the inference engine (`resolve_checkpoint`, one reader); the
    training checkpoint records its tokenizer, so the HF directory is complete (tokenizer, generation config)."""
    from conftest import cli_in_process
    from safetensors.torch import load_file

    from megatron_soaes.inference.model import load_weights

    run = cpt_ref16[0]
    forms = [run, run / "checkpoints", run / "checkpoints" / "latest", run / "checkpoints" / "iter_0000016"]
    outs = []
    for k, form in enumerate(forms):
        res = cli_in_process("convert", "megatron-to-hf", str(form), str(tmp_path / f"hf{k}"))
        assert res.returncode == 0, res.stderr
        outs.append(load_file(next((tmp_path / f"hf{k}").glob("*.safetensors"))))
        assert load_weights(form)[0] == load_weights(forms[-1])[0]
    assert all(o.keys() == outs[0].keys() and all(o[n].equal(outs[0][n]) for n in o) for o in outs)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf0" / f).exists(), f

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SOAES_CACHE", str(ROOT / ".cache" / "assets"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict:
    """The environment for a job a test starts: in-process tests of this pytest run hold a rendezvous port
    in MASTER_PORT (and RANK/WORLD_SIZE), which a job of its own must not inherit."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def torchrun(nproc: int, script, *args, timeout=600):
    """Run `script` under torchrun with `nproc` gloo processes; fail with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env())
    if res.returncode:
        raise AssertionError(f"torchrun {script} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """`soaes <args>` in this process, for commands that only read configs (dry runs, refusals): a subprocess
    would spend its seconds importing torch and megatron-core."""
    import contextlib
    import io

    from megatron_soaes.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(map(str, args)))
            except SystemExit as e:  # argparse
                rc = e.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def read_json(path):
    return json.loads(Path(path).read_text())


SESSION_PREFIX = "session-"  # session fixtures' directories; every other one is removed when its module ends


def session_dir(tmp_path_factory, name: str) -> Path:
    """A directory that lives for the whole test session (shared models and data)."""
    return tmp_path_factory.mktemp(SESSION_PREFIX + name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.module.__dict__["_soaes_failed"] = True
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_disk(request, tmp_path_factory):
    """Remove a module's temporary directories when it ends (kept if one of its tests failed): a whole run
    writes about 20 GB of checkpoints, which must not pile up on a CI disk until the session ends."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = {p.name for p in base.iterdir()}
    yield
    if request.module.__dict__.get("_soaes_failed"):
        return
    for p in base.iterdir():
        if p.name not in before and not p.name.startswith(SESSION_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Random tiny HF Qwen2 models: tied/untied embeddings, GQA ratio 4, and one with an unpadded vocab."""
    from megatron_soaes.models.random_init import make_random_hf_model

    base = session_dir(tmp_path_factory, "hf")
    out = {}
    for name, kw in {
        "tied": dict(tie_word_embeddings=True),
        "untied": dict(tie_word_embeddings=False),
        "odd_vocab": dict(tie_word_embeddings=False, vocab_size=1000),
    }.items():
        make_random_hf_model(base / name, "test", seed=len(out), **kw)
        out[name] = base / name
    return out


@pytest.fixture(scope="session")
def cpt_data(tmp_path_factory):
    from megatron_soaes.data.corpora import build_demo_corpora
    from megatron_soaes.data.preprocess import preprocess
    from megatron_soaes.data.tokenizer import train_sentencepiece

    d = session_dir(tmp_path_factory, "cpt")
    build_demo_corpora(d / "corpora")
    texts = []
    for n in ("domain.train", "general.train"):
        with open(d / "corpora" / f"{n}.jsonl") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(1500), f)]
    spm = train_sentencepiece(texts, d / "spm", vocab_size=4000)
    for n in ("domain.train", "general.train", "domain.valid", "general.valid"):
        preprocess(d / "corpora" / f"{n}.jsonl", d / n, str(spm), progress=False)
    return d


@pytest.fixture(scope="session")
def cpt_ref16(cpt_data, tmp_path_factory):
    """One 16-step run of the tests' CPT config (checkpoints at 8 and 16) that the resume, kill and
    preemption tests continue and compare with: (its directory, its losses by step). Copy, never change it."""
    from test_cpt import losses, write_config

    from megatron_soaes.config import load_config
    from megatron_soaes.training import train
    from megatron_soaes.training.cpt import CPTTask

    ref = session_dir(tmp_path_factory, "cpt-ref16") / "ref"
    train(load_config(write_config(cpt_data, ref, steps=16)), CPTTask(), log=lambda s: None)
    return ref, losses(ref)


@pytest.fixture(scope="session")
def small_sft(cpt_data, tmp_path_factory):
    """Three small stages cut from the demo SFT data, and a CPT-like base checkpoint."""
    from megatron_soaes.checkpoint.convert import hf_to_megatron
    from megatron_soaes.data.sft_demo import build_sft_demo
    from megatron_soaes.models.random_init import make_random_hf_model

    d = session_dir(tmp_path_factory, "sft")
    build_sft_demo(d / "full")
    for name in ("consultation", "recitation", "soae_qa"):
        for split, n in (("train", 24), ("valid", 4), ("test", 6)):
            lines = (d / "full" / f"{name}.{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"{name}.{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    make_random_hf_model(d / "hf", "test", vocab_size=4096)
    hf_to_megatron(d / "hf", d / "base", progress=False)
    return d

"""How the package is put together: no import loops between its packages, a wheel (no `-e`) that
holds every package and runs, and one meaning for a job config whichever command starts it."""

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from package_graph import PKG, package_imports  # noqa: E402


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m] if m in stack else [n, m]
            if m not in state:
                cyc = visit(m, stack + [m])
                if cyc:
                    return cyc
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cyc = visit(n, [n])
            if cyc:
                return cyc
    return None


def test_no_import_loop_between_packages():
    graph = package_imports()
    assert {"config", "training", "inference", "speculative", "eval", "workflows"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the layering a newcomer can rely on
    assert not graph["config"] - {"utils"}, graph["config"]
    for low in ("inference", "eval"):
        assert not graph[low] & {"speculative", "sft", "training", "workflows", "cli"}, (low, graph[low])
    assert not graph["training"] & {"sft", "distill", "workflows"}, graph["training"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_wheel_holds_every_package_and_runs_without_editable_install(tmp_path):
    """`pip wheel .` -> every package folder is in the wheel; installed (no -e) into a fresh venv that
    reuses the project's dependencies, `soaes train --dry-run` runs from it."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "SOAES_NO_CUDA": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("megatron_soaes-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for folder in sorted({str(p.parent.relative_to(ROOT)) for p in PKG.rglob("*.py")}):
        assert any(n.startswith(folder + "/") for n in names), f"{folder} is missing from {wheel.name}"
        assert f"{folder}/__init__.py" in names, f"{folder}/__init__.py is missing from {wheel.name}"
    assert any(re.match(r"megatron_soaes/_C\..*\.so$", n) for n in names), "the native verify op is not in the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # the project's dependencies, but not its editable install (.pth files of that directory are not run)
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = venv / "bin" / "python"
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import megatron_soaes.training.trainer as t; print(t.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(site)), where.stdout + where.stderr
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "parallel": {"tensor_parallel": 2},
                                   "data": {"tokenizer": "x", "seq_length": 64, "train": [{"path": "/data/x"}]},
                                   "train": {"steps": 10, "global_batch_size": 8, "output_dir": str(tmp_path / "o")}}))
    run = subprocess.run([str(venv / "bin" / "soaes"), "train", "--config", str(cfg), "--dry-run", "--world-size", "4",
                          "--skip-path-check"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and "config OK for world size 4" in run.stdout and "DP 2" in run.stdout, run.stderr


# ---------------- one meaning for a job, whichever command runs it ----------------

def _chat_records(n: int) -> list[dict]:
    law = ["企业国有资产属于国家所有。", "国务院代表国家行使企业国有资产所有权。", "公司股东依法享有资产收益。",
           "国有独资公司设董事会。", "审计机关对国有企业的资产进行审计监督。"]
    return [{"messages": [{"role": "user", "content": f"问题{i}：{law[i % 5]}这是什么意思？" * (1 + i % 3)},
                          {"role": "assistant", "content": law[(i + 1) % 5] * (1 + i % 4)}]} for i in range(n)]


def test_sft_epochs_become_the_same_steps_in_train_distill_sft_and_pipeline(cpt_data, tmp_path, capsys):
    from megatron_soaes.cli import main
    from megatron_soaes.config import load_config
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.sft.task import train_rows

    data = tmp_path / "demo-spm"  # the pipeline keeps each tokenizer's data in its own directory
    (data / "sft").mkdir(parents=True)
    (data / "spm.model").write_bytes((cpt_data / "spm.model").read_bytes())
    for split, n in (("train", 37), ("valid", 4)):
        (data / "sft" / f"consultation.{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _chat_records(n)), encoding="utf-8")
    train_file = str(data / "sft" / "consultation.train.jsonl")
    sft = {"train": [{"path": train_file}], "epochs": 2.5, "default_system": None, "packing": True}
    common = {"model": {"preset": "test", "overrides": {"vocab_size": 4096}},
              "data": {"tokenizer": str(data / "spm.model"), "seq_length": 128},
              "train": {"global_batch_size": 4, "micro_batch_size": 2, "dtype": "fp32"}}

    def write(name, cfg):
        (tmp_path / name).write_text(yaml.safe_dump(cfg, allow_unicode=True))
        return str(tmp_path / name)

    def steps_in(out: str) -> list[int]:
        return [int(x) for x in re.findall(r"train\.steps (\d+)", out)]

    sft_job = write("sft.yaml", {**common, "kind": "sft", "sft": sft,
                                 "train": {**common["train"], "output_dir": str(tmp_path / "o1")}})
    distill_job = write("distill.yaml", {**common, "kind": "distill", "sft": sft,
                                         "train": {**common["train"], "output_dir": str(tmp_path / "o2")},
                                         "distill": {"teacher": {"preset": "test", "overrides": {"vocab_size": 4096},
                                                                 "checkpoint": str(tmp_path / "teacher")}}})
    recipe = write("recipe.yaml", {"name": "r", "output_dir": str(tmp_path / "o3"), "init_checkpoint": "/nowhere",
                                   "job": {**common, "sft": {"default_system": None, "packing": True}},
                                   "stages": [{"name": "consultation", "train": [train_file], "epochs": 2.5}]})
    pipeline = write("pipeline.yaml", {
        # raw SFT files and no general corpus here: no curation, no retention gate (their inputs are absent)
        "name": "p", "output_dir": str(tmp_path / "o4"), "retention": None,
        "data": {"dir": str(tmp_path / "demo"), "tokenizer": "spm", "curation": {"enabled": False}},
        "base": {"preset": "test"}, "cpt": {"steps": 4, "seq_length": 128},
        "sft": {"stages": [{"name": "consultation", "data": "consultation", "epochs": 2.5}], "seq_length": 128,
                "global_batch_size": 4, "micro_batch_size": 2, "single_stage": False},
        "distill": {"student_preset": "test", "seq_length": 128}})

    found = {}
    for name, argv in {"train": ["train", "--config", sft_job, "--dry-run"],
                       "distill": ["distill", "--config", distill_job, "--dry-run", "--skip-path-check"],
                       "sft": ["sft", "--recipe", recipe, "--dry-run"],
                       "pipeline": ["pipeline", "--config", pipeline, "--dry-run"]}.items():
        assert main(argv) == 0, name
        out = capsys.readouterr().out
        lines = [ln for ln in out.splitlines() if "kind sft" in ln or "kind distill" in ln]
        if name == "pipeline":
            lines = [ln for ln in lines if ln.startswith("sft stage")]
        found[name] = steps_in("\n".join(lines))
    rows = train_rows(load_config(sft_job), load_tokenizer(str(data / "spm.model")), progress=False)[1]["rows"]
    expected = math.ceil(2.5 * rows / 4)
    assert expected > 2
    assert found == {k: [expected] for k in found}, found

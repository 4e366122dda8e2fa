"""Domain-progressive SFT: ordered stages, each starting from the previous stage's final weights.

A recipe (YAML) holds the settings shared by every stage (`job`, `sft`) and the ordered `stages`,
each naming its data, epochs or steps, optional replay of earlier stages' data and optimiser /
training overrides. Stage k writes ``<output_dir>/stage<k>_<name>/`` (checkpoints, metrics.jsonl,
qa_answers.jsonl) and, when finished and evaluated, ``stage.json``; a finished stage is skipped on
re-runs, an unfinished one resumes from its last checkpoint. `single_stage(recipe)` is the
ablation baseline: one stage over the union of the stages' training data.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

from pydantic import Field, model_validator

from megatron_soaes.training.config import ConfigError, load_config, parse_config
from megatron_soaes.training.config import StrictModel as _Strict


class StageFile(_Strict):
    path: str
    repeat: int = Field(1, ge=1)


class Stage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train: list[str | StageFile] = Field(min_length=1)
    valid: dict[str, list[str | StageFile]] = Field(default_factory=dict)
    epochs: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)
    replay_fraction: float = Field(0.0, ge=0, le=1)  # of this stage's examples, drawn from earlier stages
    optim: dict = Field(default_factory=dict)
    train_overrides: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        return self


class Evaluation(_Strict):
    qa: str | None = None  # held-out QA file (never in any stage's training data)
    limit: int | None = Field(100, ge=1)
    max_new_tokens: int = Field(128, ge=1)


class Recipe(_Strict):
    name: str
    output_dir: str
    init_checkpoint: str  # stage 1 starts here (the CPT result)
    job: dict  # model / parallel / data (tokenizer, seq_length) / optim / train, shared by the stages
    sft: dict = Field(default_factory=dict)  # shared SFTSection options (template, packing, truncation)
    stages: list[Stage] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)


def load_recipe(path) -> Recipe:
    return load_config(path, model=Recipe)


def resolve_checkpoint(path) -> Path:
    """A checkpoint dir, a `checkpoints/` dir with `latest`, or a run dir holding `checkpoints/`."""
    p = Path(path)
    for base in (p, p / "checkpoints"):
        if (base / "latest").exists():
            return base / (base / "latest").read_text().strip()
    if not p.exists():
        raise ConfigError(f"checkpoint {p} does not exist")
    return p


def _files(items) -> list[dict]:
    return [{"path": f, "repeat": 1} if isinstance(f, str) else f.model_dump() for f in items]


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def stage_job(recipe: Recipe, k: int, init_checkpoint, output_dir):
    """The validated JobConfig of stage k (1-based)."""
    st = recipe.stages[k - 1]
    earlier = [f for s in recipe.stages[:k - 1] for f in _files(s.train)]
    job = _merge(recipe.job, {
        "kind": "sft",
        "model": {"init_checkpoint": str(init_checkpoint)},
        "optim": st.optim,
        # with epochs, steps is a placeholder until `prepare_sft_job` counts the packed rows
        "train": {**st.train_overrides, "output_dir": str(output_dir), "steps": st.steps or 1_000_000_000},
        "sft": _merge(recipe.sft, {"train": _files(st.train), "valid": {n: _files(v) for n, v in st.valid.items()},
                                   "epochs": st.epochs, "replay": earlier if st.replay_fraction else [],
                                   "replay_fraction": st.replay_fraction}),
    })
    return parse_config(job, f"{recipe.name}: stage {k} ({st.name})")


def single_stage(recipe: Recipe) -> Recipe:
    """The ablation baseline: one stage over the union of every stage's training data (each file
    repeated as many times as its stage's integer epochs), same shared settings."""
    epochs = {st.epochs for st in recipe.stages}
    same = len(epochs) == 1 and None not in epochs  # e.g. every stage 0.5 epochs: the union, 0.5 epochs
    train = []
    for st in recipe.stages:
        reps = 1 if same else (int(st.epochs) if st.epochs and float(st.epochs).is_integer() else 1)
        train += [StageFile(path=f["path"], repeat=f["repeat"] * reps) for f in _files(st.train)]
    last = recipe.stages[-1]
    base = Stage(name="single-stage", train=train, valid=last.valid, epochs=epochs.pop() if same else 1.0,
                 optim=last.optim, train_overrides=last.train_overrides)
    return recipe.model_copy(update={"name": recipe.name + "-single", "stages": [base],
                                     "output_dir": recipe.output_dir.rstrip("/") + "-single"})


def parse_stages(spec: str | None, n: int) -> list[int]:
    if not spec:
        return list(range(1, n + 1))
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if not 1 <= lo <= hi <= n:
            raise ConfigError(f"--stages {spec!r}: stages are 1..{n}")
        out += range(lo, hi + 1)
    return sorted(set(out))


def _stage_dir(recipe: Recipe, k: int) -> Path:
    return Path(recipe.output_dir) / f"stage{k}_{recipe.stages[k - 1].name}"


def _last_eval(run_dir: Path) -> dict:
    evals = [json.loads(line)["eval"] for line in open(run_dir / "metrics.jsonl") if '"eval"' in line]
    return evals[-1] if evals else {}


def run_curriculum(recipe: Recipe, stages: str | None = None, force: bool = False, log=print) -> list[dict]:
    """Run (or resume) the selected stages in order. Collective under torchrun/srun."""
    import torch

    from megatron_soaes.data.sft import Template
    from megatron_soaes.data.tokenizer import load_tokenizer
    from megatron_soaes.sft.evaluate import evaluate_qa
    from megatron_soaes.sft.task import SFTTask, prepare_sft_job
    from megatron_soaes.training.loop import train

    sel = parse_stages(stages, len(recipe.stages))
    records = []
    for k in sel:
        sdir = _stage_dir(recipe, k)
        done = sdir / "stage.json"
        if force and done.exists():
            shutil.rmtree(sdir)
        if done.exists():
            log(f"stage {k} ({recipe.stages[k - 1].name}): done, skipped ({done})")
            records.append(json.loads(done.read_text()))
            continue
        if k == 1:
            init = resolve_checkpoint(recipe.init_checkpoint)
        else:
            prev = _stage_dir(recipe, k - 1)
            if not (prev / "stage.json").exists():
                raise ConfigError(f"stage {k} starts from stage {k - 1}, which has not finished ({prev}); "
                                  f"run --stages {k - 1}-{k} or the whole recipe")
            init = resolve_checkpoint(prev)
        job, stats = prepare_sft_job(stage_job(recipe, k, init, sdir))
        log(f"stage {k}/{len(recipe.stages)} ({recipe.stages[k - 1].name}): {stats['examples']} examples in "
            f"{stats['rows']} packed rows, {job.train.steps} steps, from {init}")
        hist = train(job, SFTTask(), log=log)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rec = {"stage": k, "name": recipe.stages[k - 1].name, "init_checkpoint": str(init), "steps": job.train.steps,
               "data": stats, "final_train_loss": hist[-1].loss if hist else None, "eval": _last_eval(sdir),
               "checkpoint": str(resolve_checkpoint(sdir))}
        if rank == 0:
            ev = recipe.evaluation
            if ev.qa:
                tok = load_tokenizer(job.data.tokenizer)
                s = job.sft
                rec["qa"] = evaluate_qa(rec["checkpoint"], tok, ev.qa, Template(s.default_system, s.last_turn_only),
                                        ev.limit, ev.max_new_tokens, out_file=sdir / "qa_answers.jsonl")
                log(f"stage {k} ({rec['name']}): " + ", ".join(f"{m} {v:.2f}" for m, v in rec["qa"].items() if m != "n"))
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False))
            os.replace(tmp, done)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        records.append(rec)
    return records


def compare(progressive: list[dict], single: list[dict], out_dir) -> dict:
    """Final-stage vs single-stage QA metrics: a table (markdown + JSON) and a PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p, s = progressive[-1].get("qa", {}), single[-1].get("qa", {})
    rows = {m: {"progressive": p.get(m), "single_stage": s.get(m),
                "ratio": (p[m] / s[m]) if p.get(m) is not None and s.get(m) else None}
            for m in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    lines = ["| metric | progressive | single-stage | ratio |", "|---|---|---|---|"]
    for m, r in rows.items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {m} | {fmt(r['progressive'])} | {fmt(r['single_stage'])} | {fmt(r['ratio'])} |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps({"progressive": progressive, "single_stage": single,
                                                     "final": rows}, indent=2, ensure_ascii=False))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, m in zip(axes, ("rouge-1", "bleu-4")):
            xs = [f"{r['stage']}:{r['name']}" for r in progressive]
            ax.plot(xs, [r.get("qa", {}).get(m, float("nan")) for r in progressive], "o-", label="progressive stages")
            if s.get(m) is not None:
                ax.axhline(s[m], color="C1", ls="--", label="single-stage")
            ax.set_title(m)
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=120)
    except ImportError:
        pass
    return rows

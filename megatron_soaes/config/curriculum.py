"""The domain-progressive SFT recipe: one job template (kind sft, everything a stage shares) and
ordered stages, each a typed patch of it (data, length, replay, optimiser / training fields).
`stage_job` builds stage k's complete JobConfig by validated copies; `single_stage` is the
ablation baseline (one stage over the union of the stages' data)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from megatron_soaes.config.base import ConfigError, StrictModel, apply, load_config, parse_config, partial, replace
from megatron_soaes.config.job import JobConfig, OptimSection, SFTFile, SFTSection, TrainSection

OptimPatch = partial(OptimSection)
TrainPatch = partial(TrainSection)


class Stage(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # also the stage directory: stage<k>_<name>
    train: list[str | SFTFile] = Field(min_length=1)  # chat files (a path, or {path, repeat})
    valid: dict[str, list[str | SFTFile]] = Field(default_factory=dict)  # held-out sets (loss)
    epochs: float | None = Field(None, gt=0)  # give epochs or steps
    steps: int | None = Field(None, ge=1)  # optimizer steps of this stage
    replay_fraction: float = Field(0.0, ge=0, le=1)  # of this stage's examples, drawn from earlier stages
    optim: OptimPatch = Field(default_factory=OptimPatch)  # fields of job.optim this stage changes
    train_overrides: TrainPatch = Field(default_factory=TrainPatch)  # fields of job.train this stage changes

    @model_validator(mode="after")
    def _length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps")
        if self.train_overrides.steps is not None or self.train_overrides.output_dir is not None:
            raise ValueError("train_overrides: steps and output_dir are set by the stage (use the stage's steps)")
        return self

    def files(self) -> list[SFTFile]:
        return _files(self.train)


class Evaluation(StrictModel):
    qa: str | None = None  # held-out QA file (never in any stage's training data)
    limit: int | None = Field(100, ge=1)  # questions scored
    max_new_tokens: int = Field(128, ge=1)  # generated per answer


class Recipe(StrictModel):
    """A domain-progressive SFT curriculum: a job template and the stages that patch it, each starting from
    the last stage's weights."""

    name: str  # the run's name in logs and reports
    output_dir: str  # stage k writes <output_dir>/stage<k>_<name>/
    init_checkpoint: str  # stage 1 starts here (the CPT result: a checkpoint or a run directory)
    job: JobConfig  # the template every stage patches: model / parallel / data / optim / train / sft options
    stages: list[Stage] = Field(min_length=1)  # in training order, from weakly relevant to expert data
    evaluation: Evaluation = Field(default_factory=Evaluation)  # held-out QA after every stage

    @field_validator("job", mode="wrap")
    @classmethod
    def _template(cls, v, handler):
        """Validated as a template: the stages fill in sft data, steps and output_dir."""
        if isinstance(v, JobConfig):
            return v
        if not isinstance(v, dict):
            return handler(v)
        return parse_config({"kind": "sft", "sft": {}, **v}, "", template=True)

    def stage_dir(self, k: int) -> Path:
        return Path(self.output_dir) / f"stage{k}_{self.stages[k - 1].name}"


def load_recipe(path, overrides: list[str] | None = None) -> Recipe:
    return load_config(path, overrides, model=Recipe)


def _files(items) -> list[SFTFile]:
    return [SFTFile(path=f) if isinstance(f, str) else f for f in items]


def stage_job(recipe: Recipe, k: int, init_checkpoint, output_dir=None, init_adapter=None) -> JobConfig:
    """The complete, validated JobConfig of stage k (1-based). With a peft section every stage trains
    adapters on the recipe's base (`init_checkpoint` is that base), stage k > 1 continuing `init_adapter`."""
    st = recipe.stages[k - 1]
    tmpl = recipe.job
    earlier = [f for s in recipe.stages[:k - 1] for f in s.files()]
    try:
        sft = replace(tmpl.sft or SFTSection(train=st.files()), train=st.files(),
                      valid={n: _files(v) for n, v in st.valid.items()}, epochs=st.epochs,
                      replay=earlier if st.replay_fraction else [], replay_fraction=st.replay_fraction)
        train = apply(tmpl.train, st.train_overrides, steps=st.steps,
                      output_dir=str(output_dir or recipe.stage_dir(k)))
        model = replace(tmpl.model, init_checkpoint=str(init_checkpoint),
                        init_adapter=str(init_adapter) if init_adapter else None)
        return JobConfig(kind="sft", model=model, parallel=tmpl.parallel, data=tmpl.data,
                         optim=apply(tmpl.optim, st.optim), train=train, sft=sft, peft=tmpl.peft)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{recipe.name}: stage {k} ({st.name}): {e}") from None


def single_stage(recipe: Recipe) -> Recipe:
    """The ablation baseline: one stage over the union of every stage's training data, same shared settings.
    With steps in every stage, it trains their sum (equal cost: the same number of steps and sequences, drawn
    from the union as its files' sizes give, not as the stages' steps split them); with epochs,
    each file is repeated as many times as its stage's integer epochs."""
    if all(st.steps for st in recipe.stages):
        last = recipe.stages[-1]
        base = Stage(name="single-stage", train=[f for st in recipe.stages for f in st.files()], valid=last.valid,
                     steps=sum(st.steps for st in recipe.stages), optim=last.optim, train_overrides=last.train_overrides)
        return recipe.model_copy(update={"name": recipe.name + "-single", "stages": [base],
                                         "output_dir": recipe.output_dir.rstrip("/") + "-single"})
    epochs = {st.epochs for st in recipe.stages}
    same = len(epochs) == 1 and None not in epochs  # e.g. every stage 0.5 epochs: the union, 0.5 epochs
    train = []
    for st in recipe.stages:
        reps = 1 if same else (int(st.epochs) if st.epochs and float(st.epochs).is_integer() else 1)
        train += [SFTFile(path=f.path, repeat=f.repeat * reps) for f in st.files()]
    last = recipe.stages[-1]
    base = Stage(name="single-stage", train=train, valid=last.valid, epochs=epochs.pop() if same else 1.0,
                 optim=last.optim, train_overrides=last.train_overrides)
    return recipe.model_copy(update={"name": recipe.name + "-single", "stages": [base],
                                     "output_dir": recipe.output_dir.rstrip("/") + "-single"})


def parse_stages(spec: str | None, n: int) -> list[int]:
    """"2-3" or "1,3" -> stage numbers (1-based); None -> all."""
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

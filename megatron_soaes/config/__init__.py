"""Typed, validated configs: the job schema (`job`), the SFT curriculum (`curriculum`) and the
pipeline (`pipeline`), with the helpers they share (`base`)."""

from megatron_soaes.config.base import (ConfigError, StrictModel, apply, load_config, parse_config, partial, read_yaml,
                                        replace)
from megatron_soaes.config.job import (DataSection, DataSource, DistillSection, DraftHeadSection, JobConfig, ModelSection, ModelSpec,
                                       OptimSection, ParallelConfig, ParallelConfigError, SFTFile, SFTSection,
                                       TeacherSection, TrainSection)

__all__ = ["ConfigError", "DataSection", "DataSource", "DistillSection", "DraftHeadSection", "JobConfig", "ModelSection", "ModelSpec",
           "OptimSection", "ParallelConfig", "ParallelConfigError", "SFTFile", "SFTSection", "StrictModel",
           "TeacherSection", "TrainSection", "apply", "load_config", "parse_config", "partial", "read_yaml", "replace"]

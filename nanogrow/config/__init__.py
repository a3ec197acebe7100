"""Run configuration: typed dataclasses with defaults, loaded from TOML, overridden by ``--set key=value``, and
validated once, before any compute, with errors that name the key at fault and the values it allows.

    schema    the sections and their fields (a field's comment is its meaning), the allowed values, building the
              typed config from a dict; a stage's ``lag`` table typed (``LagConfig``)
    load      a TOML file or a bundled config by name, ``--set`` overrides, then ``validate``
    validate  every rule, once; what train.parallel cannot do is asked of ``parallel.support``
    resolve   what the run takes from a validated config: stages with the growth defaults filled in (the one place
              a stage's value is chosen over the default), the batch layout, the parallelism, the validation length
"""

from .load import apply_overrides, bundled_config_dir, bundled_configs, load_config, read_toml, resolve_config
from .resolve import (Stage, check_global_batch, eval_seq_len, fit_warmup, from_accelerate, grad_accum, parallel_mode,
                      resolve_stages)
from .schema import (CHOICES, LAG_KEYS, SECTIONS, ConfigError, DataConfig, GrowthConfig, LagConfig, RunConfig,
                     StageConfig, TrainConfig, config_reference)
from .validate import changes_parameters, features_asked, validate, validate_parallel, validate_stages

__all__ = [
    "CHOICES", "LAG_KEYS", "SECTIONS", "ConfigError", "DataConfig", "GrowthConfig", "LagConfig", "RunConfig",
    "Stage", "StageConfig", "TrainConfig", "apply_overrides", "bundled_config_dir", "bundled_configs",
    "changes_parameters", "check_global_batch", "config_reference", "eval_seq_len", "features_asked", "fit_warmup",
    "from_accelerate", "grad_accum", "load_config", "parallel_mode", "read_toml", "resolve_config", "resolve_stages",
    "validate", "validate_parallel", "validate_stages",
]

"""Reading a config: a TOML file (or a bundled config by name), ``--set section.key=value`` overrides, then the
typed config, validated once before any compute."""

from __future__ import annotations

import ast
import copy
import tomllib
from pathlib import Path
from typing import Any

from .schema import SECTIONS, ConfigError, RunConfig
from .validate import validate


def _parse_value(text: str) -> Any:
    """A --set value: TOML-ish literals (ints, floats, true/false, quoted or bare strings)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (before typing, so errors name the key)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "stage":
            _set_stage_key(d, parts, _parse_value(value), item)
            continue
        if len(parts) != 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"--set {item!r}: key must be one of {', '.join(s + '.<key>' for s in SECTIONS)} "
                              f"or stage.N.<key> (N = 1 for the first [[stage]])")
        d.setdefault(parts[0], {})[parts[1]] = _parse_value(value)
    return d


def _set_stage_key(d: dict, parts: list[str], value: Any, item: str) -> None:
    """``stage.N.key=value`` (``stage.N.shape.n_layer=8`` for a key inside a table): N counts the [[stage]] tables
    from 1, as error messages and the stage table do (stage 0 is the starting [model]); N = one past the last adds
    a stage. Setting one of at_step / at_tokens / at_flops drops the stage's other two."""
    stages = d.setdefault("stage", [])
    count = len(stages) if isinstance(stages, list) else 0
    if len(parts) < 3 or not parts[1].isdigit() or not isinstance(stages, list):
        raise ConfigError(f"--set {item!r}: expected stage.N.key=value with N a [[stage]] number (1..{count})")
    n = int(parts[1])
    if n == 0:
        raise ConfigError(f"--set {item!r}: stage 0 is the starting model ([model], --set model.<key>=...); the "
                          f"[[stage]] tables are stage.1 .. stage.{count}")
    if n > count + 1:
        raise ConfigError(f"--set {item!r}: the config has {count} [[stage]] table(s) (stage.1 .. stage.{count}); "
                          f"stage.{count + 1} adds one")
    if n == count + 1:
        stages.append({})
    target = stages[n - 1]
    for p in parts[2:-1]:
        target = target.setdefault(p, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: stage.{n}.{p} is not a table")
    if parts[-1] in _WHENS and len(parts) == 3:
        for other in _WHENS:
            target.pop(other, None)
    target[parts[-1]] = value


_WHENS = ("at_step", "at_tokens", "at_flops")


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def bundled_config_dir() -> Path | None:
    """The configs that come with nanogrow: ``nanogrow/configs`` in an installed wheel (package data mapped from the
    repository's ``configs/``), the repository's ``configs/`` in a source checkout."""
    here = Path(__file__).resolve().parents[1]  # nanogrow/
    for d in (here / "configs", here.parent / "configs"):
        if (d / "demo.toml").is_file():
            return d
    return None


def bundled_configs() -> dict[str, Path]:
    """name -> file of every bundled config (``demo``, ``gpt2-small``, ``bench/speedup-cpu``, ...)."""
    d = bundled_config_dir()
    if d is None:
        return {}
    files = sorted(d.glob("*.toml")) + sorted((d / "bench").glob("*.toml"))
    return {f.relative_to(d).with_suffix("").as_posix(): f for f in files}


def resolve_config(path: str | Path) -> Path:
    """A config file: ``path`` if it exists, else the bundled config of that name (``demo``, ``demo.toml`` and
    ``configs/demo.toml`` all name ``demo``, so the README's commands work outside a checkout too)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.as_posix().removesuffix(".toml").removeprefix("configs/")
    found = bundled_configs().get(name)
    if found is not None:
        return found
    raise ConfigError(f"config file {str(p)!r} does not exist, and no bundled config is named {name!r} (bundled: "
                      f"{', '.join(bundled_configs()) or 'none'}; `nanogrow configs` lists them)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read TOML, apply overrides, build typed config, validate. Raises ConfigError naming the file and key."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = resolve_config(path)
        source = str(path)
        raw = read_toml(path)
    raw = apply_overrides(raw, overrides or [])
    for section in raw:
        if section not in SECTIONS and section != "stage":
            raise ConfigError(f"{source}: unknown section [{section}]; allowed: {', '.join(SECTIONS)}, [[stage]]")
    train = raw.get("train", {})
    if isinstance(train, dict) and train.get("global_batch") and "grad_accum" in train:
        raise ConfigError(f"{source}: train.global_batch={train['global_batch']} and train.grad_accum="
                          f"{train['grad_accum']} are both set; with global_batch, grad_accum is derived "
                          f"(global_batch / (world x micro_batch)): drop train.grad_accum")
    cfg = RunConfig.from_dict(raw, source=source)
    validate(cfg, source)
    return cfg

"""The whole run's config: one typed section per room, loaded from YAML plus ``a.b=c`` overrides.

Each room owns its section (``data/config.py: DataConfig``, ``teacher/config.py: TeacherConfig``,
...); this module only composes them, reads the YAML with ``yaml.safe_load``, applies overrides
and reports mistakes with the dotted key, the file and the line.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.config import DataConfig
from core.errors import UserError
from core.files import atomic_write_text
from core.schema import FieldError, build, to_dict, type_at, unknown_key_error
from profiling.report.config import ConstraintsConfig, EvalConfig
from profiling.cost.config import ProfileConfig
from student.config import ExportConfig, PruneConfig, StudentConfig
from teacher.config import TeacherConfig

__all__ = ["RunConfig", "DistillConfig", "Config", "load_config", "parse_overrides", "save_config"]


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how it is made reproducible."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    #: CPU threads for torch (None: torch's default).
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise FieldError("name", f"must be a plain folder name, got {self.name!r}")
        if self.threads is not None and self.threads < 1:
            raise FieldError("threads", f"must be >= 1 or null, got {self.threads}")


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher."""

    #: kd: Hinton soft targets + CE; hard: DeiT hard-label; feature: kd + a hint from patch tokens.
    loss: Literal["kd", "hard", "feature"] = "kd"
    temperature: float = 4.0
    #: Weight of the distillation term; (1 - alpha) goes to cross-entropy on the true labels.
    alpha: float = 0.5
    feature_weight: float = 1.0
    #: Mixup Beta(a, a) parameter for function matching (0: off); teacher and student see the same mix.
    #: The baseline student (``baseline: true``) is trained with the same mixup, without the teacher.
    mixup: float = 0.0
    #: live: run the teacher on every batch; cached: precompute it on fixed augmented views.
    teacher_outputs: Literal["live", "cached"] = "live"
    #: Fixed views cached per image; an epoch that goes over few labeled images several times
    #: (distill.unlabeled: false beside a pool) gets this many per pass.
    cache_views: int = 4
    #: Also train the same student without the teacher, to show what distillation bought.
    baseline: bool = False
    #: Learn from the teacher's outputs on the unlabeled images too (data.label_fraction < 1,
    #: data.unlabeled, synthetic.num_unlabeled); false: on the labeled images only.
    unlabeled: bool = True

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise FieldError("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.mixup < 0:
            raise FieldError("mixup", f"must be >= 0 (0 turns it off), got {self.mixup}")
        if self.cache_views < 1:
            raise FieldError("cache_views", f"must be >= 1, got {self.cache_views}")
        if self.loss == "feature" and self.teacher_outputs == "cached":
            raise FieldError(
                "loss",
                "'feature' needs distill.teacher_outputs=live: only logits are cached, not the teacher's patch tokens",
            )
        if self.mixup > 0 and self.teacher_outputs == "cached":
            raise FieldError(
                "mixup",
                "needs distill.teacher_outputs=live: a cached output belongs to one fixed view, "
                "and a random mix of two views is a new one (set distill.mixup=0 or use live)",
            )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)


#: Settings that no longer exist, and what replaced them: an old config fails with this, not with
#: a guess at the closest key.
RETIRED: dict[str, str] = {
    "student.train_fraction": (
        "was replaced by data.label_fraction, which holds the labels back from every stage (the teacher and "
        "the baseline too, not only the student; the held-back images become unlabeled): set "
        "data.label_fraction instead"
    ),
}


def _retired(key: str, where: str) -> UserError:
    return UserError(f"'{key}'{where} {RETIRED[key]}")


# ----------------------------------------------------------------------------- YAML with lines
class _NoTagsLoader(yaml.SafeLoader):
    """SafeLoader that keeps the composed node tree so keys can be traced to lines."""


def _line_map(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line number, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        walk(yaml.compose(text, Loader=_NoTagsLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    if not path.is_file():
        hint = ""
        configs = Path("configs")
        names = ", ".join(sorted(p.name for p in configs.glob("*.yaml"))) if configs.is_dir() else ""
        if names:
            hint = f" (the configs in ./configs are: {names})"
        raise UserError(f"config file '{path}' not found{hint}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"{path}:{where}: {exc.problem} — tags such as !!python/object are refused; "
            "a config holds plain values only"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a mapping of sections (run:, data:, ...), got {type(raw).__name__}")
    return raw, _line_map(text)


# ----------------------------------------------------------------------------- overrides
def _is_text(tp: Any) -> str | None:
    """'plain' for a str key, 'optional' for str | None, None for anything else."""
    if tp is str:
        return "plain"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(args) == {str, type(None)}:
        return "optional"
    return None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["teacher.epochs=3", "run.name=x"]`` -> nested dict with values converted to the key's type."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.key=value (e.g. teacher.epochs=3)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in RETIRED:
            raise _retired(key, " (command-line override)")
        try:
            tp = type_at(Config, key)
        except KeyError:
            raise unknown_key_error(key, Config, " (command-line override)") from None
        if _is_text(tp):
            # Paths and names stay verbatim ('/data/run #1' must not lose its '#1' to YAML).
            value: Any = None if _is_text(tp) == "optional" and text.strip() in ("null", "~") else text
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' sets a key inside '{part}', which is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply ``a.b=c`` overrides, and return the validated :class:`Config`."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    over = parse_overrides(overrides or [])
    merged = _merge(raw, over)

    def where(key: str) -> str:
        top = key.split("[")[0]
        node: Any = over
        for part in top.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return " (command-line override)"
        probe = top
        while probe:
            if probe in lines:
                return f" ({path} line {lines[probe]})"
            probe = probe.rpartition(".")[0]
        return f" ({path})"

    for key in RETIRED:
        section, _, name = key.rpartition(".")
        if isinstance(merged.get(section), dict) and name in merged[section]:
            raise _retired(key, where(key))
    return build(Config, merged, where)


# ----------------------------------------------------------------------------- saving
def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (temporary file, then rename)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

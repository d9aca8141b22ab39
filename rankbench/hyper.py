"""Declared hyperparameters: type, default, valid range and search hint, and how
``--set key=value`` strings become validated values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rankbench.errors import RankbenchError


@dataclass(frozen=True)
class Search:
    """How a study should sample a hyperparameter (used by Optuna studies)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Hyper:
    """One declared hyperparameter: its type, default, valid range and search hint."""

    default: Any
    help: str = ""
    type: type | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    search: Search | None = None
    nullable: bool = False
    label: bool = False
    """Part of a configuration's name: run names (``ours[lambda=0.2]-seed0``) and report rows show it."""

    @property
    def kind(self) -> type:
        return self.type or type(self.default)

    def describe(self) -> str:
        default = "none" if self.default is None else self.default
        extra = f" one of {'|'.join(map(str, self.choices))}" if self.choices else ""
        return f"{default}{extra}"

    def parse(self, name: str, text: str) -> Any:
        """Convert a ``--set`` string to this hyperparameter's type, then validate it."""
        kind = self.kind
        if self.nullable and text.strip().lower() in ("none", "null", ""):
            return None
        try:
            if kind is bool:
                lowered = text.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value: Any = lowered in ("true", "1", "yes")
            elif kind is int:
                value = int(text)
            elif kind is float:
                value = float(text)
            else:
                value = kind(text)
        except ValueError:
            raise RankbenchError(
                f"--set {name}={text}: expected {kind.__name__} (default {self.describe()})"
            ) from None
        return self.validate(name, value)

    def validate(self, name: str, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise RankbenchError(f"{name} cannot be none: give a {self.kind.__name__}")
        kind = self.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise RankbenchError(f"{name}={value!r}: expected {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise RankbenchError(f"{name}={value}: must be a finite number")
        if self.minimum is not None and value < self.minimum:
            raise RankbenchError(f"{name}={value}: must be >= {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise RankbenchError(f"{name}={value}: must be <= {self.maximum}")
        if self.choices is not None and value not in self.choices:
            raise RankbenchError(f"{name}={value!r}: choose one of {', '.join(map(str, self.choices))}")
        return value


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """``["lambda=0.2", "rank=10"]`` → ``{"lambda": "0.2", "rank": "10"}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RankbenchError(f"--set {item!r}: write key=value, e.g. --set lambda=0.2")
        key = key.strip()
        if key in out:
            raise RankbenchError(f"--set {key!r} is given twice ({out[key]!r}, then {value.strip()!r}): give each "
                                 "key once")
        out[key] = value.strip()
    return out


def resolve(
    declared: Mapping[str, Hyper], overrides: Mapping[str, Any], owner: str
) -> dict[str, Any]:
    """Defaults of ``declared`` updated by validated ``overrides`` (strings are parsed)."""
    values = {name: h.default for name, h in declared.items()}
    for name, raw in overrides.items():
        if name not in declared:
            raise RankbenchError(f"{owner} has no hyperparameter {name!r}: valid are {', '.join(declared) or 'none'}")
        h = declared[name]
        values[name] = h.parse(name, raw) if isinstance(raw, str) and h.kind is not str else h.validate(name, raw)
    return values

"""Declared hyperparameters: type, default, valid range and search hint, and how
``--set key=value`` strings become validated values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rankbench.errors import RankbenchError


@dataclass(frozen=True)
class Search:
    """How a study should sample a hyperparameter (used by Optuna studies).

    A study file that names the key with an empty table (``[search] lambda = {}``)
    samples this range; give either ``low``/``high`` or ``choices``.

    Example:
        ``Hyper(1e-3, "weight of the L1 penalty", minimum=0.0, search=Search(1e-5, 1e-1, log=True))``

    Attributes:
        low: Lower end of the interval (inclusive).
        high: Upper end of the interval (inclusive).
        log: Sample the interval on a log scale.
        choices: The values to choose from, instead of an interval.
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Hyper:
    """One declared hyperparameter: its type, default, valid range and search hint.

    ``Method.hyperparameters`` and ``Task.hyperparameters`` map names to these.
    ``--set key=value`` strings are parsed to ``type`` and validated against
    ``minimum``, ``maximum`` (inclusive) and ``choices``; floats must be finite. The
    default itself must validate.

    Attributes:
        default: The value when nothing sets it (the paper's, for the full dataset).
        help: One line, shown by ``rankbench list``.
        type: The value's type; defaults to ``type(default)`` (give it when the
            default is ``None``).
        minimum: Smallest valid value (inclusive), or ``None``.
        maximum: Largest valid value (inclusive), or ``None``.
        choices: The valid values, or ``None``.
        search: The range a study samples from, or ``None``.
        nullable: ``None`` (``--set key=none``) is a valid value.
        label: Part of a configuration's name (see below).
    """

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
        """The value's type: ``type``, else ``type(default)``."""
        return self.type or type(self.default)

    def describe(self) -> str:
        """The default as ``rankbench list`` prints it (``none`` for ``None``), with its choices.

        Returns:
            E.g. ``"soft one of soft|hard"``.
        """
        default = "none" if self.default is None else self.default
        extra = f" one of {'|'.join(map(str, self.choices))}" if self.choices else ""
        return f"{default}{extra}"

    def parse(self, name: str, text: str) -> Any:
        """Convert a ``--set`` string to this hyperparameter's type, then validate it.

        ``bool`` accepts true/false/1/0/yes/no; a nullable one accepts none/null.

        Args:
            name: The key, for the error message.
            text: The string given on the command line.

        Returns:
            The typed, validated value.

        Raises:
            RankbenchError: The string does not parse, or the value is out of range.
        """
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
        """Check a typed value against the declaration (an int is accepted for a float).

        Args:
            name: The key, for the error message.
            value: The value (a study file's, a default, or a parsed ``--set``).

        Returns:
            The value, an int converted to float for a float hyperparameter.

        Raises:
            RankbenchError: A wrong type, ``None`` where not nullable, a non-finite
                float, or a value outside ``minimum``/``maximum``/``choices``.
        """
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

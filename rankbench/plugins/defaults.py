"""Where every default of a run comes from, in one documented order, read from data the plugins declare.

Lowest to highest:

1. the hyperparameters' own defaults (``Hyper.default``: the paper's recipe, for the full dataset);
2. the method's defaults for this task (``Method.task_defaults["TASK"]``, e.g. the paper's λ for LeNet-5);
3. the recipe (``Task.recipes[NAME].task`` for the task's keys, ``Method.task_defaults["TASK/NAME"]``
   for the method's): ``paper`` changes nothing; ``embedded`` is chosen by itself when the small
   embedded default data is loaded, a method's own recipe on a task whose recipe reproduces the
   method's published experiment (``MethodDefaults(recipe=...)`` on ``"TASK"``) on any data, and
   any recipe by ``--recipe NAME``;
4. what the user set (``--set``, ``--epochs``, a study's values).

A step budget (``--budget steps=N``) then sets the epochs from the data's size. Tasks never name
methods and methods name tasks only in their own ``task_defaults``; :func:`check_declarations`
refuses a table that names an unknown task, recipe or key when the plugins are discovered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rankbench.errors import RankbenchError
from rankbench.hyper import Hyper

if TYPE_CHECKING:
    from rankbench.plugins.method import Method
    from rankbench.plugins.task import Task

PAPER = "paper"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class Recipe:
    """A named set of defaults for a task's hyperparameters, and why they were chosen.

    Declared in ``Task.recipes`` under its name, e.g. ``{"embedded": Recipe(task={"lr": 1e-3},
    on_embedded_data=True, why="...")}``. Its values replace the hyperparameters'
    defaults, except the keys the user sets; a method's values on the recipe live with
    the method (``Method.task_defaults["TASK/NAME"]``).

    Attributes:
        task: Hyperparameter name → value, for the task's keys.
        why: Why, printed with the recipe at the start of a run.
        on_embedded_data: See below.
    """

    task: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""
    on_embedded_data: bool = False
    """Chosen by itself when the embedded default data is loaded (no ``--recipe`` given)."""


@dataclass(frozen=True)
class MethodDefaults:
    """A method's defaults on one task (or one task's recipe), and why; a plain dict means no why.

    A value of ``Method.task_defaults``, e.g.
    ``{"mlp2/embedded": MethodDefaults({"prior_n": 60000}, "why")}``.

    Attributes:
        values: Hyperparameter name → value, for the method's keys.
        why: Why, printed with the method's line at the start of a run.
        recipe: See below.
    """

    values: Mapping[str, Any]
    why: str = ""
    recipe: str | None = None
    """On a ``"TASK"`` entry: the task's recipe this method runs without ``--recipe``, on any data (a
    recipe that reproduces the method's own published experiment, e.g. MARS's notebook on ``mlp2``)."""


@dataclass(frozen=True)
class Resolved:
    """The values of one (task, method, recipe) and where each came from."""

    recipe: str
    task: dict[str, Any]
    method: dict[str, Any]
    sources: dict[str, str]
    """Key → ``default``, ``TASK defaults of METHOD``, ``recipe NAME``, ``METHOD on TASK/NAME`` or ``set``."""
    why: tuple[str, ...] = ()
    """Why the recipe and the method's defaults are what they are (printed with the run)."""


def recipes_of(task_cls: type[Task]) -> dict[str, Recipe]:
    """The task's recipes; ``paper`` (the hyperparameters' defaults) is always one of them."""
    return {PAPER: Recipe(why="the hyperparameters' defaults"), **task_cls.recipes}


def method_defaults(method_cls: type[Method], key: str) -> MethodDefaults:
    entry = method_cls.task_defaults.get(key, {})
    return entry if isinstance(entry, MethodDefaults) else MethodDefaults(dict(entry))


def automatic_recipe(task_cls: type[Task], embedded: bool, method_cls: type[Method] | None = None) -> str:
    """The recipe a run gets without ``--recipe``: the method's own on this task if it names one
    (``MethodDefaults.recipe``), else the task's embedded-data one on the embedded data."""
    if method_cls is not None:
        own = method_defaults(method_cls, task_cls.name).recipe
        if own is not None:
            return own
    if embedded:
        for name, recipe in recipes_of(task_cls).items():
            if recipe.on_embedded_data:
                return name
    return PAPER


def resolve_defaults(task_cls: type[Task], method_cls: type[Method], recipe: str,
                     task_set: Mapping[str, Any], method_set: Mapping[str, Any]) -> Resolved:
    """Every value of one run, in the module's order; ``*_set`` are the user's validated values.

    The recorded recipe name is ``paper`` when the recipe changes none of this run's values, so
    runs that ran the same values group into one report row."""
    recipes = recipes_of(task_cls)
    if recipe not in recipes:
        raise RankbenchError(f"--recipe {recipe}: task {task_cls.name} has the recipes {', '.join(recipes)}")
    task, method = task_cls.name, method_cls.name
    sources: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Hyper], Mapping[str, Any], str]] = [
        ("task", task_cls.hyperparameters, {k: h.default for k, h in task_cls.hyperparameters.items()}, "default"),
        ("method", method_cls.hyperparameters, {k: h.default for k, h in method_cls.hyperparameters.items()},
         "default"),
        ("method", method_cls.hyperparameters, method_defaults(method_cls, task).values,
         f"{method} defaults on {task}"),
        ("task", task_cls.hyperparameters, recipes[recipe].task, f"recipe {recipe}"),
        ("method", method_cls.hyperparameters, method_defaults(method_cls, f"{task}/{recipe}").values,
         f"{method} defaults on {task}/{recipe}"),
        ("task", task_cls.hyperparameters, task_set, "set"),
        ("method", method_cls.hyperparameters, method_set, "set"),
    ]
    values: dict[str, dict[str, Any]] = {"task": {}, "method": {}}
    for side, declared, given, source in layers:
        for key, value in given.items():
            values[side][key] = declared[key].validate(key, value) if key in declared else value
            sources[key] = source
    recipe_defaults = method_defaults(method_cls, f"{task}/{recipe}")
    changed = recipe != PAPER and bool(recipes[recipe].task or recipe_defaults.values)
    task_defaults = method_defaults(method_cls, task)
    why = [recipes[recipe].why] if changed else []
    why += [d.why for d in (task_defaults, recipe_defaults) if (d.values or d.recipe == recipe) and d.why]
    return Resolved(recipe if changed else PAPER, values["task"], values["method"], sources,
                    tuple(w for w in why if w))


def check_declarations(tasks: Mapping[str, type[Task]], methods: Mapping[str, type[Method]]) -> dict[str, str]:
    """Plugins whose defaults tables cannot be right: name → why (the registry lists them as broken).

    A method's ``task_defaults`` may name only installed tasks and their recipes, and only the
    method's own hyperparameters with valid values; a task's recipes only its own; and a key may
    not be declared by both a method and a task (``--set KEY`` would be ambiguous)."""
    from rankbench.records import PARAMS

    broken: dict[str, str] = {}
    reserved = {str(p) for p in PARAMS}
    for kind, table in (("task", tasks), ("method", methods)):
        for name, plugin in table.items():
            taken = sorted(set(plugin.hyperparameters) & reserved)
            if taken:
                broken[name] = (f"{kind} {name} declares {taken[0]!r}, a name rankbench records itself (see "
                                "rankbench.records): rename the hyperparameter")
    for name, task_cls in tasks.items():
        for recipe_name, recipe in recipes_of(task_cls).items():
            problem = _invalid(recipe.task, task_cls.hyperparameters)
            if problem:
                broken[name] = f"task {name}: recipe {recipe_name}: {problem}"
    for name, method_cls in methods.items():
        for task_name, task_cls in tasks.items():
            both = sorted(set(method_cls.hyperparameters) & set(task_cls.hyperparameters))
            if both:
                broken[name] = (f"method {name} declares {both[0]!r}, which task {task_name} declares too: rename "
                                "the method's hyperparameter")
        for key in method_cls.task_defaults:
            task_name, _, recipe_name = key.partition("/")
            if task_name not in tasks:
                broken[name] = (f"method {name}: task_defaults names task {task_name!r}, which is not installed "
                                f"(tasks: {', '.join(sorted(tasks))})")
            elif recipe_name and recipe_name not in recipes_of(tasks[task_name]):
                broken[name] = (f"method {name}: task_defaults names recipe {key!r}, but task {task_name} has "
                                f"{', '.join(recipes_of(tasks[task_name]))}")
            else:
                entry = method_defaults(method_cls, key)
                problem = _invalid(entry.values, method_cls.hyperparameters)
                if entry.recipe is not None and recipe_name:
                    problem = f"recipe={entry.recipe!r} belongs on the task's entry {task_name!r}, not on a recipe's"
                elif entry.recipe is not None and entry.recipe not in recipes_of(tasks[task_name]):
                    problem = (f"recipe={entry.recipe!r} is not a recipe of task {task_name} "
                               f"({', '.join(recipes_of(tasks[task_name]))})")
                if problem:
                    broken[name] = f"method {name}: task_defaults[{key!r}]: {problem}"
    return broken


def _invalid(values: Mapping[str, Any], declared: Mapping[str, Hyper]) -> str | None:
    for key, value in values.items():
        if key not in declared:
            return f"{key!r} is not a declared hyperparameter"
        try:
            declared[key].validate(key, value)
        except RankbenchError as exc:
            return str(exc)
    return None

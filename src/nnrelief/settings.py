"""One declaration per setting: a dataclass field's help, range and choices.

A settings dataclass (:class:`~nnrelief.training.TrainConfig`,
:class:`~nnrelief.experiments.config.ExperimentConfig`) declares each field with
:func:`setting` (or copies another class's declaration with :func:`like`); validation
(:func:`check_fields`), the command-line flags, the TOML key check (:func:`check_keys`) and
the help text are all read from that declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Spec",
    "check_fields",
    "check_keys",
    "check_value",
    "describe",
    "document",
    "flag_of",
    "in_interval",
    "like",
    "normalise_choice",
    "setting",
    "spec_of",
    "specs",
    "suggestion",
]

_KEY = "nnrelief.setting"


@dataclass(frozen=True)
class Spec:
    """What a setting means and which values it takes.

    Attributes:
        help: one line for ``--help`` and the docs.
        range: interval of a number (of each entry of a list), e.g. ``"(0, 1]"`` (``(``
            open, ``[`` closed, ``inf`` unbounded); ``None`` stays allowed where the type allows it.
        choices: the allowed words; given in any case, a value becomes its choice's spelling.
        flag: whether the setting has a command-line flag.
        metavar: the placeholder of its values in ``--help``.
        convert: ``convert(name, value)`` turns another spelling of a value (e.g. a TOML
            table) into the field's type before it is checked; ``ValueError`` starting
            with ``name`` for a bad one.
    """

    help: str
    range: str | None = None
    choices: tuple[str, ...] | None = None
    flag: bool = True
    metavar: str | None = None
    convert: Callable[[str, Any], Any] | None = None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    range: str | None = None,
    choices: Sequence[str] | None = None,
    factory: Callable[[], Any] | None = None,
    flag: bool = True,
    metavar: str | None = None,
    convert: Callable[[str, Any], Any] | None = None,
) -> Any:
    """A dataclass field declaring its :class:`Spec` (``factory`` for mutable defaults)."""
    if range is not None:
        _bounds(range)  # a malformed interval fails where it is declared
    spec = Spec(help, range, None if choices is None else tuple(choices), flag, metavar, convert)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def like(cls: type, name: str, default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
         help: str | None = None) -> Any:  # fmt: skip
    """A field with the range and choices of ``cls``'s field ``name`` (the same setting in
    another place), another default and, optionally, a help line of its own."""
    spec = dataclasses.replace(specs(cls)[name], help=help or specs(cls)[name].help)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    """The :class:`Spec` a field was declared with; ``TypeError`` for a field without one."""
    try:
        return f.metadata[_KEY]
    except KeyError:
        raise TypeError(f"field {f.name} is not declared with nnrelief.settings.setting()") from None


def specs(cls: type) -> dict[str, Spec]:
    """Every field's :class:`Spec` of the dataclass ``cls``, in declaration order."""
    return {f.name: spec_of(f) for f in dataclasses.fields(cls)}


def flag_of(name: str) -> str:
    """The command-line flag of the setting ``name`` (``retrain_epochs`` -> ``--retrain-epochs``)."""
    return "--" + name.replace("_", "-")


def _bounds(interval: str) -> tuple[float, float]:
    if interval[:1] not in "([" or interval[-1:] not in ")]" or interval.count(",") != 1:
        raise ValueError(f"interval {interval!r} must look like '(0, 1]' or '[1, inf)'")
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    return low, high


def in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` (e.g. ``"(0, 1]"``)."""
    low, high = _bounds(interval)
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def suggestion(word: str, known: Iterable[str], spell: Callable[[str], str] = str) -> str:
    """``" (did you mean X?)"`` for the known word closest to ``word`` (compared as ``spell``
    writes them; of equally close ones, one that ``word`` begins), else ``""``."""
    spelled = {spell(k): k for k in known}
    close = difflib.get_close_matches(spell(word), list(spelled), n=3, cutoff=0.6)
    if not close:
        return ""
    best = next((c for c in close if c.startswith(spell(word))), close[0])
    return f" (did you mean {spelled[best]}?)"


def normalise_choice(value: str, choices: Sequence[str], name: str) -> str:
    """``value`` as spelled in ``choices`` (``"SGD"`` -> ``"sgd"``); ``ValueError`` otherwise."""
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}{suggestion(value.lower(), choices)}")


def check_value(name: str, value: Any, spec: Spec) -> Any:
    """``value`` checked against ``spec`` (finite, in range, one of the choices) and with a
    choice spelled as declared; ``ValueError`` saying what is wrong otherwise. The caller
    applies ``spec.convert`` first (:func:`check_fields` does)."""
    items = value if isinstance(value, list) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if any(not math.isfinite(v) for v in numbers):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if spec.range is not None and any(not in_interval(v, spec.range) for v in numbers):
        what = "entries " if isinstance(value, list) else ""
        raise ValueError(f"{name} {what}must be in {spec.range}, got {value}")
    if spec.choices is not None and isinstance(value, str):
        return normalise_choice(value, spec.choices, name)
    return value


def check_fields(obj: Any) -> None:
    """Check every declared field of the dataclass instance ``obj`` in place (:func:`check_value`)."""
    for f in dataclasses.fields(obj):
        spec, value = spec_of(f), getattr(obj, f.name)
        setattr(obj, f.name, check_value(f.name, value if spec.convert is None else spec.convert(f.name, value), spec))


def check_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """``ValueError`` naming the keys of ``data`` that are not ``known`` (with the closest
    known key, ``-`` read as ``_``) and the known ones."""
    known = list(known)
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = "".join(suggestion(key, known, lambda k: k.replace("-", "_")) for key in unknown[:1])
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}{hints}; valid: {', '.join(known)}")


def describe(spec: Spec) -> str:
    """The help line of a setting with its range and choices."""
    parts = [spec.help]
    if spec.range is not None:
        parts.append(f"in {spec.range}")
    if spec.choices is not None and not all(choice in spec.help for choice in spec.choices):
        parts.append(f"one of {', '.join(spec.choices)}")
    return "; ".join(parts)


def document(cls: type) -> type:
    """Class decorator: append an ``Attributes:`` section written from the fields' specs to the docstring."""
    lines = [f"        {name}: {describe(spec)}." for name, spec in specs(cls).items()]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Attributes:\n" + "\n".join(lines) + "\n"
    return cls

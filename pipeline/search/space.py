"""The search space of a sweep: ``space.yaml`` parsed, validated and mapped to Optuna.

Each top-level key is a knob; its value is one of

* a list of choices: ``r: [4, 8, 16]`` -> ``trial.suggest_categorical``
* a range: ``lr: {low: 1.0e-4, high: 1.0e-2, log: true}`` (float) or ``r: {low: 4, high: 16, step: 4}``
  (int) -> ``suggest_float`` / ``suggest_int``
* a fixed value: ``epochs: 3`` (not searched, used by every trial)

``layers`` takes 1-based backbone blocks: ``layers: [1, 2, 3, 5]`` is ONE fixed set;
``layers: [all, [2, 4, 6], "1,3,5"]`` is a choice among sets; ``decoder_layers`` likewise (the T5
side decoder on a label-word cache). ``head: [task, lm]`` compares a new task head with scoring the
label words by the frozen LM head.

Example::

    r: [4, 8, 16]
    gate: [learnable, sum]
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    weight_decay: [0.0, 0.01]
    epochs: 3
    batch_size: 32
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.side.config import GATES, HEADS, INITS, POOLINGS
from pipeline.errors import LstError, TrainError

__all__ = ["SpaceError", "Knob", "SearchSpace", "load_space", "read_yaml", "KNOBS", "SIDE_KNOBS"]


class SpaceError(TrainError):
    """A space file the sweep cannot use; the message names the knob and what to write instead."""


def _knobs() -> dict[str, tuple[str, str]]:
    """knob -> (where it goes, value type), from the config fields marked ``knob`` in their metadata:
    a new sweepable option is declared once, on its dataclass field."""
    import dataclasses

    from pipeline.side.config import SideConfig
    from pipeline.train.config import TrainConfig

    out = {}
    for where, cls in (("side", SideConfig), ("train", TrainConfig)):
        out.update({f.name: (where, f.metadata["knob"]) for f in dataclasses.fields(cls) if "knob" in f.metadata})
    return out


KNOBS: dict[str, tuple[str, str]] = _knobs()
SIDE_KNOBS = [k for k, (where, _) in KNOBS.items() if where == "side"]
_RANGE_KEYS = {"low", "high", "log", "step"}


def _blocks() -> list[str]:
    from pipeline.side.blocks import available_blocks

    return available_blocks()


def _check_value(name: str, v: Any) -> Any:
    """Type- and range-check one value of knob ``name``; returns it normalised (YAML '1e-4' -> 1e-4)."""
    kind = KNOBS[name][1]
    if name == "attention_dropout" and v is None:
        return None  # None: as dropout
    if kind == "float":
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise SpaceError(f"{name}: {v!r} is not a number") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpaceError(f"{name}: {v!r} is not a number")
        v = float(v)
        if name == "lr" and not v > 0:
            raise SpaceError(f"lr must be > 0, got {v}")
        if name in ("weight_decay", "tap_noise") and v < 0:
            raise SpaceError(f"{name} must be >= 0, got {v}")
        if name in ("warmup_ratio", "dropout", "attention_dropout") and not 0 <= v < 1:
            raise SpaceError(f"{name} must be in [0, 1), got {v}")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpaceError(f"{name}: {v!r} is not an integer")
        if name in ("r", "epochs", "batch_size") and v < 1:
            raise SpaceError(f"{name} must be >= 1, got {v}")
        return v
    if kind == "layers":
        return _layers_value(v, name)
    # categorical strings
    allowed = {"gate": GATES, "init": INITS, "pooling": (*POOLINGS, None), "block": tuple(_blocks()),
               "head": HEADS}[name]
    if v not in allowed:
        raise SpaceError(f"{name}: {v!r} is not one of {', '.join(map(repr, allowed))}")
    return v


def _layers_value(v: Any, name: str = "layers") -> str:
    """A layer set as its canonical string ('all' or '1,2,3'), the form Optuna stores."""
    if v is None or v == "all":
        return "all"
    if isinstance(v, str):
        try:
            v = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise SpaceError(f"{name}: {v!r} is not 'all' or comma-separated block numbers such as '1,2,3'") from None
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise SpaceError(f"{name}: {v!r} is not 'all' or a list of 1-based block numbers such as [1, 2, 3]")
    if any(x < 1 for x in v) or v != sorted(set(v)):
        raise SpaceError(f"{name}: {v!r} must be increasing 1-based block numbers without duplicates")
    return ",".join(map(str, v))


def decode_layers(s: str) -> list[int] | None:
    return None if s == "all" else [int(x) for x in s.split(",")]


@dataclass
class Knob:
    name: str
    kind: str  # 'fixed' | 'choice' | 'int' | 'float'
    values: list | None = None  # fixed: [value]; choice: the choices
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.values)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        if self.kind in ("fixed", "choice"):
            return list(self.values)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise SpaceError(f"{self.name}: the grid sampler needs a list of values or a range with a step "
                             f"(e.g. {{low: {self.low}, high: {self.high}, step: ...}}); or use --sampler random|tpe")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(n)]

    def describe(self) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return list(self.values)
        d = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


def _parse_knob(name: str, spec: Any) -> Knob:
    kind = KNOBS[name][1]
    if kind == "layers" and isinstance(spec, list) and spec and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in spec):
        return Knob(name, "fixed", [_layers_value(spec, name)])  # one layer set
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"{name}: empty list of values; give at least one")
        values = [_check_value(name, v) for v in spec]
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"{name}: duplicate values in {spec}")
        return Knob(name, "choice", values) if len(values) > 1 else Knob(name, "fixed", values)
    if isinstance(spec, dict):
        if kind not in ("int", "float"):
            raise SpaceError(f"{name} is categorical: give a list of values (e.g. {name}: [a, b]), not a range")
        unknown = sorted(set(spec) - _RANGE_KEYS)
        if unknown or "low" not in spec or "high" not in spec:
            raise SpaceError(f"{name}: a range is {{low: ..., high: ..., log: true|false, step: ...}}; "
                             f"got keys {sorted(spec)}")
        low, high = _check_value(name, spec["low"]), _check_value(name, spec["high"])
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise SpaceError(f"{name}: log must be true or false, got {log!r}")
        step = spec.get("step")
        if step is not None:
            step = _check_value(name, step) if kind == "int" else float(step)
            if not step > 0:
                raise SpaceError(f"{name}: step must be > 0, got {step}")
            if log:
                raise SpaceError(f"{name}: a range takes log or step, not both")
        if not low < high:
            raise SpaceError(f"{name}: low ({low}) must be below high ({high})")
        if log and not low > 0:
            raise SpaceError(f"{name}: a log range needs low > 0, got {low}")
        return Knob(name, kind, low=low, high=high, log=log, step=step)
    return Knob(name, "fixed", [_check_value(name, spec)])


class SearchSpace:
    def __init__(self, knobs: dict[str, Knob], source: str = "<dict>"):
        self.knobs = knobs
        self.source = source

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> "SearchSpace":
        if not isinstance(d, dict) or not d:
            raise SpaceError(f"{source}: a space is a mapping of knobs to values, e.g. 'r: [4, 8, 16]'; "
                             f"known knobs: {', '.join(KNOBS)}")
        unknown = [k for k in d if k not in KNOBS]
        if unknown:
            raise SpaceError(f"{source}: unknown knob(s) {', '.join(map(repr, unknown))}; known knobs: {', '.join(KNOBS)}")
        knobs = {}
        for k, v in d.items():
            try:
                knobs[k] = _parse_knob(k, v)
            except SpaceError as e:
                raise SpaceError(f"{source}: {e}") from None
        return cls(knobs, source)

    @property
    def searched(self) -> list[str]:
        return [k for k, kn in self.knobs.items() if kn.kind != "fixed"]

    def suggest(self, trial) -> dict:
        """Values of every knob for this trial (searched ones through Optuna, fixed ones as given)."""
        return {k: kn.suggest(trial) for k, kn in self.knobs.items()}

    def grid(self) -> dict[str, list]:
        """Grid of the searched knobs, for optuna's GridSampler."""
        return {k: kn.grid() for k, kn in self.knobs.items() if kn.kind != "fixed"}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values()) if self.searched else 1

    def describe(self) -> dict:
        return {k: kn.describe() for k, kn in self.knobs.items()}

    def train_fields(self, params: dict) -> dict:
        """TrainConfig fields (with a ``side`` dict) for one trial's values."""
        side, train = {}, {}
        for k, v in params.items():
            if KNOBS[k][1] == "layers":
                v = decode_layers(v)
            (side if KNOBS[k][0] == "side" else train)[k] = v
        return {**train, "side": side}

    def check_against(self, backbone_config) -> None:
        """Every side-network value of the space must build on this backbone (r divides the widths,
        layers exist, ...): one bad value is an error before any trial runs."""
        from pipeline.side.config import SideConfig

        values: dict[str, list] = {}
        for k in SIDE_KNOBS:
            if k not in self.knobs:
                continue
            kn = self.knobs[k]
            if kn.kind == "float":
                values[k] = [kn.low, kn.high]
            else:
                values[k] = kn.grid()
        # each value alone, then the cross product of the shape knobs (small: a few r x blocks)
        combos = [{k: v} for k, vs in values.items() for v in vs]
        shape = [k for k in ("r", "block", "init") if k in values]
        combos += [dict(zip(shape, c)) for c in itertools.product(*(values[k] for k in shape))] if shape else []
        for c in combos:
            side = {k: (decode_layers(v) if KNOBS[k][1] == "layers" else v) for k, v in c.items()}
            try:
                SideConfig(**side).resolved(backbone_config)
            except ValueError as e:
                what = ", ".join(f"{k}={v}" for k, v in c.items())
                raise SpaceError(f"{self.source}: {what} cannot be built on this backbone: {e}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own message spans several, with the offending source)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def read_yaml(path: str | Path, what: str, error: type[LstError]) -> Any:
    """The parsed content of a user's YAML file. Every way the file can be unusable (missing, a
    directory, unreadable, not text, not YAML) is one ``error`` line naming ``what`` and the fix,
    so `lst sweep --space` and `lst train --config` report them alike."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a directory; give a YAML file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {_yaml_problem(e)}; fix the file") from None
    except UnicodeDecodeError:
        raise error(f"{what} {p} is not a text file; give a YAML file") from None
    except OSError as e:
        raise error(f"{what} {p} cannot be read: {e.strerror or e}") from None


def load_space(space: str | Path | dict) -> SearchSpace:
    """A SearchSpace from a YAML path or a dict."""
    if isinstance(space, dict):
        return SearchSpace.from_dict(space)
    return SearchSpace.from_dict(read_yaml(space, "space file", SpaceError), source=str(space))

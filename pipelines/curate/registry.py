"""Find curation steps by name: the built-ins, installed plugins and `module:Class` paths.

A package adds steps by exposing them in the entry point group `pipelines.curate_steps`
(`my_step = my_package.steps:MyStep`); a config can also name any importable class directly
(`step: my_package.steps:MyStep`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from pipelines.curate.step import Step
from pipelines.errors import PipelineError

ENTRY_POINT_GROUP = "pipelines.curate_steps"


def builtin_steps() -> dict[str, type[Step]]:
    from pipelines.curate.steps import BUILTIN_STEPS

    return {cls.name: cls for cls in BUILTIN_STEPS}


def available_steps() -> dict[str, type[Step]]:
    """Every step that can be named in a config: built-ins first, then installed plugins."""
    steps = builtin_steps()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in steps:
            steps[ep.name] = ep  # loaded when used, so one broken plugin does not break the others
    return steps


def _check_step_class(obj: Any, where: str) -> type[Step]:
    if not (isinstance(obj, type) and issubclass(obj, Step)):
        raise PipelineError(f"{where} is not a curation step (a subclass of pipelines.curate.Step)")
    return obj


def find_step(name: str) -> type[Step]:
    """The step class called `name`, or a PipelineError listing the available ones."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PipelineError(f"cannot load step {name!r}: {exc}") from exc
        return _check_step_class(obj, name)
    steps = available_steps()
    if name not in steps:
        raise PipelineError(f"unknown curation step {name!r}; available: {', '.join(sorted(steps))} "
                            "(or a `module:Class` path)")
    found = steps[name]
    if isinstance(found, type):
        return found
    try:
        return _check_step_class(found.load(), f"entry point {found.value!r} ({name})")
    except ImportError as exc:
        raise PipelineError(f"cannot load step {name!r} from {found.value}: {exc}") from exc


def build_step(spec: dict[str, Any], index: int) -> Step:
    """A configured step from one entry of a config's `steps` list: `{step: NAME, PARAM: VALUE, ...}`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("step"), str):
        raise PipelineError(f"steps[{index}]: expected a mapping with a `step` name, got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "step"}
    cls = find_step(spec["step"])
    try:
        return cls(cls.Params.model_validate(params))
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise PipelineError(f"steps[{index}] ({spec['step']}): {detail}") from exc

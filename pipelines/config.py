"""Typed configs: pydantic models loaded from YAML and overridden from the command line.

Every leaf field of a config model becomes a command-line option of the same name
(`image_size` -> `--image-size`), so a YAML file and the command line can set the
same things and nothing has to be declared twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from pipelines.errors import InfrastructureError, PipelineError
from pipelines.runtime import check_ray_numbers


class ConfigModel(BaseModel):
    """Base of every config: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that change how a job runs but not what it produces, left out of digest(); in
    # pydantic's `exclude` form: {"quiet": True, "fetch": {"timeout", ...}}.
    run_options: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _section_defaults(cls, data: Any) -> Any:
        """However a config is built (a file, the command line, Prefect's parameters), a partly given
        section keeps the defaults its parent chose for it (see `_with_section_defaults`)."""
        return _with_section_defaults(cls, data) if isinstance(data, dict) else data

    def digest(self) -> str:
        """A stable sha256 of the fields that determine the output, for caching and lineage."""
        blob = json.dumps(self.model_dump(mode="json", exclude=self.run_options), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def leaf_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield (path, FieldInfo) for every non-model field, descending into nested models."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, prefix + (name,))
        else:
            yield prefix + (name,), field


def default_at(model: type[BaseModel], path: tuple[str, ...]) -> Any:
    """The default of the field at `path`, as the top-level model sets it: a nested section's default
    instance may override its class's defaults (fine-tuning's engine section does)."""
    node = model.model_fields[path[0]].get_default(call_default_factory=True)
    for key in path[1:]:
        node = getattr(node, key)
    return node


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{where}: {e['msg']}")
    return f"invalid config ({source}): " + "; ".join(parts)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty for an empty file); a PipelineError for anything else."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"config {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise PipelineError(f"config {path} must be a mapping at the top level")
    return loaded or {}


def config_kind(path: str | Path | None, overrides: dict[tuple[str, ...], Any] | None = None) -> str | None:
    """The `kind` a config asks for (`kind: clip`): from the overrides, else from the file, else None."""
    given = (overrides or {}).get(("kind",))
    if given is None and path:
        given = read_config_file(path).get("kind")
    return None if given is None else str(given)


def load_config(model: type[ConfigModel], path: str | Path | None = None,
                overrides: dict[tuple[str, ...], Any] | None = None) -> Any:
    """Build `model` from an optional YAML file, then apply `overrides` keyed by field path."""
    data = read_config_file(path) if path else {}
    for key_path, value in (overrides or {}).items():
        node = data
        for key in key_path[:-1]:
            node = node.setdefault(key, {})
        node[key_path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_format_validation_error(exc, str(path) if path else "command line")) from exc


def _with_section_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each partly given section completed by that section's default instance, not its
    class: `--workers 2` must not reset the other engine settings a config class chose for itself."""
    out = dict(data)
    for name, field in model.model_fields.items():
        default = field.default
        if isinstance(out.get(name), dict) and isinstance(default, BaseModel):
            chosen = default.model_dump(exclude_unset=True)
            out[name] = _with_section_defaults(type(default), {**chosen, **out[name]})
    return out


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """Map a field annotation to a type typer understands, plus a hint for the help text."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else (str, "")
    if origin is Literal:
        return str, "One of: " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return list[str], "Repeat the option for several values."
    if annotation in (bool, int, float, str):
        return annotation, ""
    return str, ""


def _shown(value: Any, flag: str) -> str:
    """A default as a user would type it: `--quiet`/`--no-quiet` for a flag, a list's items, text unquoted;
    nothing for None (the field's description says what unset means) or an empty list."""
    if value is None or value == []:
        return ""
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "''" if value == "" else str(value)


def kind_of(model: type[BaseModel]) -> str | None:
    """The value of a config model's `kind` field (`Literal["clip"]`), None when it has none."""
    field = model.model_fields.get("kind")
    return None if field is None else field.default


def _merged(per_kind: dict[Any, str]) -> str:
    """One help fragment from each config's own: the text when they agree, else `lm: ...; clip: ...`."""
    texts = set(per_kind.values())
    if len(texts) == 1:
        return texts.pop()
    return "; ".join(f"{kind}: {text.removesuffix('.')}" for kind, text in per_kind.items() if text)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Our errors as one line on stderr, never a traceback: a user's mistake (PipelineError) exits with
    code 2, a failure of the infrastructure under the job (InfrastructureError: worth a rerun) with 1.
    An environment that would crash Ray on import is refused first (`check_ray_numbers`)."""
    try:
        check_ray_numbers()
        yield
    except (PipelineError, InfrastructureError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, PipelineError) else 1) from None


def config_command(model: type[ConfigModel], run: Callable[[Any], Any],
                   *others: tuple[type[ConfigModel], Callable[[Any], Any]]) -> Callable[..., Any]:
    """Wrap `run(config)` into a typer command whose options are the fields of `model`.

    `--config FILE.yaml` loads a file; each option given on the command line overrides it. Errors are
    printed as one line (`one_line_errors`).

    With `others`, one command runs several configs told apart by their `kind` field (`kind: clip` in
    the file, or `--kind clip`; the first config when neither says): the options are all the configs'
    fields, a field the chosen config lacks is refused, and each runs with its own `run`.
    """
    variants = {kind_of(m): (m, r) for m, r in [(model, run), *others]}
    if len(variants) != 1 + len(others):
        raise TypeError("configs of one command need distinct `kind`s")
    kinds = list(variants)
    # parameter name -> kind -> (path, field); one option per name, the same path in every config
    options: dict[str, dict[str | None, tuple[tuple[str, ...], Any]]] = {}
    flags: dict[str, str] = {}
    for kind, (m, _) in variants.items():
        for path, field in leaf_fields(m):
            if (field.json_schema_extra or {}).get("cli") is False:  # set in the YAML file only
                continue
            name, flag = "__".join(path), path[-1].replace("_", "-")
            if flags.setdefault(flag, name) != name:
                raise TypeError(f"option --{flag} is ambiguous: {flags[flag]} and {name}")
            options.setdefault(name, {})[kind] = (path, field)

    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
        default=typer.Option(None, "--config", "-c", help="YAML file with any of the options below."))]
    for name, per_kind in options.items():
        path = next(iter(per_kind.values()))[0]
        flag = path[-1].replace("_", "-")
        cli_types, texts, defaults = set(), {}, {}
        for kind, (_, field) in per_kind.items():
            cli_type, hint = _cli_type(field.annotation)
            if path == ("kind",):
                hint = "One of: " + ", ".join(map(str, kinds))
            cli_types.add(cli_type)
            texts[kind] = " ".join(filter(None, [field.description, hint]))
            defaults[kind] = _shown(default_at(variants[kind][0], path), flag)
        cli_type = cli_types.pop() if len(cli_types) == 1 else str
        only = f"({', '.join(map(str, per_kind))} only) " if len(per_kind) < len(variants) else ""
        required = all(field.is_required() for _, field in per_kind.values())
        if path == ("kind",):  # the first config's, the one a file without `kind` gets
            defaults = {kinds[0]: defaults[kinds[0]]}
        shown = _merged(defaults)
        default_shown = " [required]" if required else f" [default: {shown}]" if shown else ""
        # Typer reads help as rich markup: brackets in a description or a default are text.
        help_text = escape(only + _merged(texts) + default_shown)
        decls = [f"--{flag}/--no-{flag}"] if cli_type is bool else [f"--{flag}"]
        # A list is given by repeating the option, one value each time (the hint says so).
        metavar = "<str>" if cli_type == list[str] else None
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[cli_type],
            default=typer.Option(None, *decls, help=help_text, show_default=False, metavar=metavar)))

    flags_of = {name: flag for flag, name in flags.items()}

    def command(**kwargs: Any) -> Any:
        path = kwargs.pop("config")
        given = {name: value for name, value in kwargs.items() if value is not None and value != []}
        with one_line_errors():
            kind = kinds[0]
            if len(variants) > 1:
                kind = config_kind(path, {("kind",): given.get("kind")}) or kinds[0]
                if kind not in variants:
                    raise PipelineError(f"kind {kind!r}: expected one of {', '.join(map(str, kinds))}")
            config_model, run_config = variants[kind]
            overrides = {}
            for name, value in given.items():
                if kind not in options[name]:
                    raise PipelineError(f"--{flags_of[name]} is not an option of a {kind} config "
                                        f"(it is one of {', '.join(map(str, options[name]))})")
                overrides[options[name][kind][0]] = None if value == "" else value
            return run_config(load_config(config_model, path, overrides))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = run.__doc__
    return command

"""The fleet file's sections as pydantic models, and pydantic's errors as our problem lines.

Each section is validated on its own; a section with problems is validated again without the
keys that had them, so the checks that need several keys still run on the rest and a file's
every problem is reported at once, one line each."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["DefaultsSection", "FleetFile", "SupervisordSection", "WorkerSection", "check", "typename"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal"})


def typename(v: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _env_name(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise PydanticCustomError("env_name", "not a valid environment variable name")
    return name


def _env_value(value: str | int) -> str | int:
    # supervisord's environment= grammar cannot carry these (it strips quotes at both ends)
    if isinstance(value, str) and value and (
            "\n" in value or ('"' in value and "'" in value) or value[0] in "'\"" or value[-1] in "'\""):
        raise PydanticCustomError("env_quotes", "may not contain a newline or both kinds of quote, nor start or "
                                                "end with a quote")
    return value


Port = Annotated[int, Field(ge=1, le=65535, description="an integer")]
AtLeastOne = Annotated[int, Field(ge=1, description="an integer")]
Strings = Annotated[list[str], Field(description="a list of strings")]
Text = Annotated[str, Field(description="a string")]
NonEmpty = Annotated[str, Field(min_length=1, description="a non-empty string")]
EnvTable = dict[Annotated[str, AfterValidator(_env_name)], Annotated[str | int, AfterValidator(_env_value)]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SupervisordSection(_Section):
    dir: NonEmpty | None = None
    socket: NonEmpty | None = None
    socket_owner: NonEmpty | None = None
    logfile_maxbytes: (Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^[0-9]+(KB|MB|GB)?$")]
                       | None) = Field(None, description='bytes or a size like "50MB"')
    logfile_backups: Annotated[int, Field(ge=0, description="an integer >= 0")] | None = None
    startsecs: Annotated[int, Field(ge=0, description="an integer >= 0")] | None = None
    startretries: Annotated[int, Field(ge=0, description="an integer >= 0")] | None = None
    stop_margin_s: Annotated[int, Field(ge=1, description="an integer >= 1")] | None = None


class DefaultsSection(_Section):
    """What ``[defaults]`` may set: every worker key but id/port/count/metrics_port."""

    host: Text | None = None
    backend: Text | None = None
    user: Text | None = None
    models: Strings | None = None
    tags: Strings | None = None
    args: Strings | None = None
    env: EnvTable | None = Field(None, description="a table")
    model_path: dict[str, Annotated[str, Field(min_length=1)]] | None = Field(None, description="a table")
    max_concurrency: AtLeastOne | None = None
    pipeline_cache_size: AtLeastOne | None = None
    drain_grace_s: Annotated[float, Field(ge=0, description="a number of seconds")] | None = None


class WorkerSection(DefaultsSection):
    """One ``[[worker]]`` entry (``id`` and ``port`` are required: checked by the parser)."""

    id: Text | None = None
    port: Port | None = None
    count: AtLeastOne | None = None
    metrics_port: Port | None = None


class FleetFile(_Section):
    supervisord: dict[str, Any] = Field(default_factory=dict, description="a table")
    defaults: dict[str, Any] = Field(default_factory=dict, description="a table")
    worker: list[dict[str, Any]] = Field(default_factory=list, description="an array of tables ([[worker]])")


def _field_bounds(model: type[BaseModel], key: str) -> tuple[Any, Any, str]:
    info = model.model_fields.get(key)
    lo = hi = None
    description = (info.description if info else None) or ""
    metadata = list(info.metadata) if info else []
    annotation = info.annotation if info else None
    for arg in getattr(annotation, "__args__", ()):  # X | None: the bounds sit on X's metadata
        metadata += list(getattr(arg, "__metadata__", ()))
    for m in list(metadata):
        metadata += list(getattr(m, "metadata", ()))  # a FieldInfo inside Annotated holds its own
    for m in metadata:
        lo = getattr(m, "ge", lo)
        hi = getattr(m, "le", hi)
        description = getattr(m, "description", None) or description
    return lo, hi, description or "valid"


def _line(model: type[BaseModel], err: dict[str, Any], raw: dict[str, Any], unknown: str) -> str:
    loc = err["loc"]
    key = str(loc[0]) if loc else ""
    value = raw.get(key)
    if err["type"] == "extra_forbidden":
        return f"{unknown} {key!r} (known: {', '.join(sorted(model.model_fields))})"
    if key in ("env", "model_path") and len(loc) >= 2 and isinstance(value, dict):
        sub = str(loc[1])
        if err["type"] == "env_name":
            return f"env name {sub!r} is not a valid environment variable name"
        if err["type"] == "env_quotes":
            return f"env {sub} {err['msg']}"
        v = value.get(sub)
        if key == "env":
            return f"env {sub} must be a string (got {typename(v)} {v!r})"
        return f"model_path {sub!r} must be a folder path string (got {typename(v)} {v!r})"
    lo, hi, expected = _field_bounds(model, key)
    if err["type"] in _RANGE_ERRORS and len(loc) == 1:
        if lo is not None and hi is not None:
            return f"{key} {value} is out of range {lo}..{hi}"
        return f"{key} must be at least {lo} (got {value})"
    return f"{key} must be {expected} (got {typename(value)} {value!r})"


def check(model: type[BaseModel], raw: dict[str, Any], *, unknown: str = "unknown key",
          ) -> tuple[dict[str, Any], list[str]]:
    """The keys of ``raw`` that are valid for ``model`` (as set in the file), and one line per
    problem: a key's problems count once (a table's: once per entry)."""
    try:
        return model.model_validate(raw).model_dump(exclude_unset=True), []
    except ValidationError as exc:
        errors = exc.errors()
    problems: list[str] = []
    seen: set[tuple] = set()
    bad: set[str] = set()
    for err in errors:
        loc = tuple(err["loc"])
        key = str(loc[0]) if loc else ""
        bad.add(key)
        ident = loc[:2] if key in ("env", "model_path") else loc[:1]
        if ident not in seen:
            seen.add(ident)
            problems.append(_line(model, err, raw, unknown))
    good = model.model_validate({k: v for k, v in raw.items() if k not in bad}).model_dump(exclude_unset=True)
    return good, problems

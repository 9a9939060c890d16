"""Stage configs: one pydantic model per stage, loaded from YAML with ``key=value`` overrides.

Every field has a docstring (``use_attribute_docstrings``) that ``alignline <stage> --help-config`` prints.
Errors name the field, what was wrong and how to fix it; the resolved config is saved in the run directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from alignline.data.io import atomic_write_text
from alignline.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, field docstrings are descriptions.

    A block whose default is a stage-specific instance (``Field(default_factory=default_dpo_train)``) is
    *updated* by what the user gives, not replaced: ``train.lr=1e-5`` on ``dpo`` keeps DPO's other training
    defaults (batch size, accumulation, warm-up) instead of falling back to the class defaults.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _update_default_blocks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            given = out.get(name)
            if not isinstance(given, dict) or field.default_factory is None:
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[name] = _merge(default.model_dump(exclude_unset=False), given)
        return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-5", "model=x"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_names(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) and hasattr(model, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def config_error(cls: type[BaseModel], exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        name = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            known = _field_names(cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown setting '{name}'{hint} (known here: {', '.join(known)})")
        elif err["type"] == "missing":
            lines.append(f"setting '{name}' is required; set it in the YAML file or as {name}=...")
        elif not loc:  # a check across settings: its message names them (the input would be the whole config)
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"setting '{name}': {msg} (got {err.get('input')!r})")
    return ConfigError(f"invalid {cls.__name__} from {source}:\n  " + "\n  ".join(lines))


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file holds ({} for an empty file); ``what`` names the file's role in errors."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of settings at the top level, found "
                          f"{type(data).__name__}")
    return data or {}


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides (overrides win)."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        data = read_yaml_mapping(Path(path), "config file")
        source = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise config_error(cls, exc, source) from None


def with_overrides(cfg: C, overrides: list[str] | None) -> C:
    """``cfg`` with ``key=value`` overrides applied (validated again; itself when there are none)."""
    if not overrides:
        return cfg
    data = _merge(cfg.model_dump(), parse_overrides(overrides))
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        raise config_error(type(cfg), exc, f"{type(cfg).__name__} given + overrides") from None


def resolved_yaml(cfg: BaseModel) -> str:
    """The resolved config (every default filled in, secrets as '**********') as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save_resolved(cfg: BaseModel, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Save the resolved config (:func:`resolved_yaml`) in the run directory."""
    path = Path(out_dir) / name
    atomic_write_text(path, resolved_yaml(cfg))
    return path


def describe(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
             ) -> list[tuple[str, str, str]]:
    """(dotted name, default, docstring) for every field, recursing into sections; for --help-config. A
    block's defaults are those of the stage (its default instance), not of the block's class."""
    rows = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if defaults is not None:
            value, required = getattr(defaults, name), False
        else:
            required = field.is_required()
            value = None if required else field.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, f"{prefix}{name}.", value if isinstance(value, BaseModel) else None))
        else:
            rows.append((prefix + name, "required" if required else repr(value), field.description or ""))
    return rows


def parse_shard(value: str | None) -> str | None:
    """Validate a ``'i/N'`` shard setting (0 <= i < N); None means no explicit shard."""
    import re

    if value is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", value)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ValueError("shard must look like i/N with 0 <= i < N, e.g. 0/4")
    return value


#: A ``shard`` setting: null, or ``'i/N'`` with 0 <= i < N.
ShardSetting = Annotated[str | None, AfterValidator(parse_shard)]

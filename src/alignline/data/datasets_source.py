"""Records in the ``datasets`` library's own forms: a Hub dataset, a ``save_to_disk`` directory, an Arrow file.

A Hub dataset is written ``hf:ORG/NAME``, ``hf:ORG/NAME@REVISION`` and, for a configuration or a split other
than ``train``, ``hf:ORG/NAME?config=CONFIG&split=SPLIT``; in a YAML config also as a mapping
``{name: ORG/NAME, config: ..., split: ..., revision: ...}`` (:data:`RecordsSource` turns it into that text).
Its repository is fetched through :mod:`alignline.hub` (the Hub cache, ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE``) and read with ``datasets.load_dataset`` (its own cache of prepared Arrow files,
``HF_DATASETS_CACHE``). Rows come out as plain dicts (None left out, as JSONL files leave it out) with where they
were: the source with its split, and the row index (``dataset[i]``), the ``file:line`` of a JSONL file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from pydantic import BaseModel, BeforeValidator, ConfigDict

from alignline.errors import DataError
from alignline.hub import HubRef, fetch_snapshot, hub_commit, parse_hub_id

HF_PREFIX = "hf:"
_SYNTAX = "hf:ORG/NAME, hf:ORG/NAME@REVISION, with ?config=CONFIG&split=SPLIT if need be"


class HubDatasetSpec(BaseModel):
    """A Hub dataset as a mapping (the YAML form of ``hf:ORG/NAME@REVISION?config=CONFIG&split=SPLIT``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """The repository, ORG/NAME."""
    config: str | None = None
    """The configuration (subset); None: the dataset's default."""
    split: str = "train"
    """The split to read."""
    revision: str | None = None
    """A branch, tag or commit; None: the default branch."""

    def as_text(self) -> str:
        query = {k: v for k, v in (("config", self.config), ("split", self.split)) if v and (k, v) != ("split", "train")}
        return (f"{HF_PREFIX}{self.name}" + (f"@{self.revision}" if self.revision else "")
                + (f"?{urlencode(query)}" if query else ""))


def _mapping_as_text(value: Any) -> Any:
    if isinstance(value, dict):
        try:
            return HubDatasetSpec.model_validate(value).as_text()
        except ValueError as exc:
            raise ValueError(f"a dataset mapping takes name, config, split and revision ({exc})") from None
    return value


RecordsSource = Annotated[str, BeforeValidator(_mapping_as_text)]
"""A config field naming records: a JSONL / Parquet / Arrow file, a directory of shards or a ``save_to_disk``
directory, or a Hub dataset (``hf:...`` text, or a mapping with name, config, split, revision)."""


@dataclass(frozen=True)
class HubDataset:
    ref: HubRef
    config: str | None
    split: str

    @property
    def label(self) -> str:
        return f"{HF_PREFIX}{self.ref}[{self.config + '/' if self.config else ''}{self.split}]"


def parse_hf_source(text: str) -> HubDataset | None:
    """The Hub dataset ``text`` names (``hf:...``), None for any other text; a malformed one is a DataError."""
    if not text.startswith(HF_PREFIX):
        return None
    body, _, query = text[len(HF_PREFIX):].partition("?")
    ref = parse_hub_id(body, "dataset")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"config", "split"})
    if ref is None or unknown or any(len(v) != 1 or not v[0] for v in params.values()):
        raise DataError("not a Hub dataset name", path=text, expected=_SYNTAX,
                        found=f"unknown setting(s) {', '.join(unknown)}" if unknown else repr(text))
    return HubDataset(ref, params.get("config", [None])[0], params.get("split", ["train"])[0])


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return path.is_dir() and ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def is_datasets_source(source: str | Path) -> bool:
    """Whether ``source`` is read through ``datasets``: a Hub dataset, a save_to_disk directory, an Arrow file."""
    text = str(source)
    path = Path(text)
    return text.startswith(HF_PREFIX) or path.suffix == ".arrow" or is_saved_dataset(path)


def _cache_dir(variable: str, under_home: str) -> str | None:
    if os.environ.get(variable):
        return os.environ[variable]
    return os.path.join(os.environ["HF_HOME"], under_home) if os.environ.get("HF_HOME") else None


def _dataset_repo_files(files: list[str], label: str) -> list[str]:
    # Loading scripts are not run (datasets >= 4 refuses them too); everything else may hold data or its card.
    return [f for f in files if not f.endswith(".py") and f != ".gitattributes"]


def hub_dataset_commit(spec: HubDataset) -> str:
    """``hf:org/name@<commit>?config=...&split=...``: the Hub dataset as it will be read."""
    query = {k: v for k, v in (("config", spec.config), ("split", spec.split)) if v}
    return f"{HF_PREFIX}{spec.ref.repo_id}@{hub_commit(spec.ref, DataError)}?{urlencode(query)}"


def _load_hub(spec: HubDataset):
    import datasets

    snapshot = fetch_snapshot(spec.ref, _dataset_repo_files, DataError)
    try:
        return datasets.load_dataset(str(snapshot.path), name=spec.config, split=spec.split,
                                     cache_dir=_cache_dir("HF_DATASETS_CACHE", "datasets"))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataError(f"datasets cannot read it ({_short(exc)})", path=spec.label,
                        expected="an existing configuration and split of the dataset") from None


def _load_saved(path: Path) -> tuple[Any, str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"not a readable save_to_disk directory ({_short(exc)})", path=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = "train" if "train" in loaded else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise DataError("a DatasetDict without a train split", path=str(path), found=f"splits {splits}",
                            expected=f"one split: give its directory, e.g. {path / splits[0]}")
        return loaded[split], f"{path}[{split}]"
    return loaded, str(path)


def _load_arrow(path: Path):
    import datasets

    if not path.is_file():
        raise DataError("file not found", path=str(path), expected="an existing Arrow file")
    try:
        return datasets.Dataset.from_file(str(path))
    except (OSError, ValueError) as exc:  # pyarrow's errors are both
        raise DataError(f"not an Arrow file datasets can read ({_short(exc)})", path=str(path),
                        expected="an Arrow stream file as datasets writes it (save_to_disk, its cache)") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def without_nulls(value: Any) -> Any:
    """A row as JSONL would hold it: Arrow fills a struct's or row's missing keys with None; they are left out."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def iter_dataset_rows(source: str | Path) -> Iterator[tuple[str, int, dict]]:
    """(where, row index, row) for every row of a Hub dataset, save_to_disk directory or Arrow file."""
    spec = parse_hf_source(str(source))
    if spec is not None:
        dataset, where = _load_hub(spec), spec.label
    elif Path(source).suffix == ".arrow":
        dataset, where = _load_arrow(Path(source)), str(source)
    else:
        dataset, where = _load_saved(Path(source))
    for index, row in enumerate(dataset):
        yield where, index, without_nulls(row)

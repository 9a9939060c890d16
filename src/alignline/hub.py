"""The Hugging Face Hub: ``org/name`` and ``org/name@revision`` fetched through ``huggingface_hub``.

Files land in the library's standard cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``); ``HF_HUB_OFFLINE=1``
(or ``HF_DATASETS_OFFLINE=1`` for datasets) is honoured: a cached snapshot is used and nothing is asked of the
network. The token is the library's (``HF_TOKEN`` or the login cache); alignline never reads or writes it. A
repository is resolved to a commit once per process, so a stage's up-to-date check and its loading see the same
commit, and the commit, not the files, identifies what was read (:func:`pinned_snapshot`).

Models (:mod:`alignline.models.loading`) and datasets (:mod:`alignline.data.datasets_source`) both use
:func:`fetch_snapshot`. ``huggingface_hub`` is imported inside the functions: ``import alignline`` stays cheap.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignline.errors import AlignlineError

log = logging.getLogger(__name__)
RepoType = Literal["model", "dataset"]

# Hub repo names: letters, digits, '-', '_', '.'; a revision: a branch, tag or commit (branches may hold '/').
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?$")
# Spellings that name a local file someone forgot to create, not a Hub repo.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".json", ".jsonl", ".parquet",
                  ".arrow", ".yaml", ".yml")
_SNAPSHOT = re.compile(r"(?:^|/)(?P<kind>models|datasets)--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(?P<rest>/.*)?$")


@dataclass(frozen=True)
class HubRef:
    """A repository on the Hub and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None
    repo_type: RepoType = "model"

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def download_command(self) -> str:
        """The Hub's own command that puts this repository into the cache."""
        return ("hf download " + self.repo_id + (" --repo-type dataset" if self.repo_type == "dataset" else "")
                + (f" --revision {self.revision}" if self.revision else ""))


@dataclass(frozen=True)
class Snapshot:
    """A repository's files at one commit, in the Hub cache."""

    ref: HubRef
    path: Path
    commit: str

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: what identifies the files read (a stage's input fingerprint)."""
        return f"{self.ref.repo_id}@{self.commit}"


def parse_hub_id(text: str, repo_type: RepoType = "model") -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a :class:`HubRef`; None for anything else (a path, a file name)."""
    match = _HUB_ID.match(text)
    if match is None or ".." in text or text.lower().endswith(_FILE_SUFFIXES):
        return None
    return HubRef(match["repo"], match["revision"], repo_type)


def pinned_snapshot(path: str | Path) -> str | None:
    """``org/name@<commit>`` (and ``/sub/path`` below it) when ``path`` lies in a Hub cache snapshot, else None: a
    commit's files never change, so fingerprinting them by the commit is exact and spares hashing gigabytes."""
    match = _SNAPSHOT.search(Path(path).as_posix())
    if match is None:
        return None
    return f"{match['repo'].replace('--', '/', 1)}@{match['commit']}{match['rest'] or ''}"


def offline(repo_type: RepoType = "model") -> bool:
    """Whether the Hub may not be asked: HF_HUB_OFFLINE (as huggingface_hub read it, or as set now), and for
    datasets HF_DATASETS_OFFLINE too."""
    from huggingface_hub import constants

    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if repo_type == "dataset" else [])
    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in names)


def hub_cache_dir() -> Path | None:
    """HF_HUB_CACHE, else $HF_HOME/hub, as set now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


_SNAPSHOTS: dict[tuple, Snapshot] = {}
"""Snapshots resolved in this process, by (ref, endpoint, cache, offline): one commit per repository and run."""
_REPO_INFOS: dict[tuple, tuple[str, list[str]]] = {}
"""(commit, file list) of the repositories asked about in this process, by the same key."""


def _key(ref: HubRef) -> tuple:
    return ref, _endpoint(), hub_cache_dir(), offline(ref.repo_type)


def hub_commit(ref: HubRef, error: type[AlignlineError]) -> str:
    """The commit ``ref`` resolves to, without downloading its files: asked of the Hub once per process when
    online, read from the cache when offline."""
    key = _key(ref)
    if key in _SNAPSHOTS:
        return _SNAPSHOTS[key].commit
    def nothing(files: list[str], label: str) -> list[str]:
        return []  # no file is needed, only the commit

    if key[-1]:
        return _cached_snapshot(ref, nothing, error).commit
    try:
        return _repo_info(ref, error)[0]
    except AlignlineError as exc:
        return _cached_if_unreachable(exc, ref, nothing, error).commit


def _repo_info(ref: HubRef, error: type[AlignlineError]) -> tuple[str, list[str]]:
    key = _key(ref)
    if key not in _REPO_INFOS:
        from huggingface_hub import HfApi

        with _hub_errors(ref, error):
            info = HfApi(endpoint=_endpoint()).repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
        _REPO_INFOS[key] = (str(info.sha), [s.rfilename for s in info.siblings or []])
    return _REPO_INFOS[key]


def fetch_snapshot(ref: HubRef, choose: Callable[[list[str], str], list[str]],
                   error: type[AlignlineError]) -> Snapshot:
    """The cached snapshot of ``ref``, downloading ``choose(files, "org/name@commit")`` first when online.

    ``choose`` sees the repository's file list before anything is downloaded and returns the files to fetch (or
    raises to refuse the repository). Offline, the cached snapshot is used as it is. Failures are ``error``s that
    say how to fix them.
    """
    key = _key(ref)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = _cached_snapshot(ref, choose, error) if key[-1] else _online_snapshot(ref, choose, error)
    return _SNAPSHOTS[key]


def _online_snapshot(ref: HubRef, choose: Callable[[list[str], str], list[str]],
                     error: type[AlignlineError]) -> Snapshot:
    try:
        return _download_snapshot(ref, choose, error)
    except AlignlineError as exc:
        return _cached_if_unreachable(exc, ref, choose, error)


def _cached_if_unreachable(exc: AlignlineError, ref: HubRef, choose: Callable[[list[str], str], list[str]],
                           error: type[AlignlineError]) -> Snapshot:
    """When the Hub gave no answer at all (not a refusal), the cached snapshot, as transformers falls back to it;
    else ``exc`` again."""
    if not getattr(exc, "hub_unreachable", False):
        raise exc
    try:
        snapshot = _cached_snapshot(ref, choose, error)
    except AlignlineError:
        raise exc from None
    log.warning("%s; using the cached snapshot %s", exc, snapshot.commit)
    return snapshot


def _cached_snapshot(ref: HubRef, choose: Callable[[list[str], str], list[str]],
                     error: type[AlignlineError]) -> Snapshot:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = _cached_file_list(ref)
    try:
        # the files `choose` wants must all be there (what an online run fetched), not the whole repository
        path = snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                 cache_dir=hub_cache_dir(), local_files_only=True,
                                 allow_patterns=None if files is None else choose(files, str(ref)))
    except LocalEntryNotFoundError as exc:
        where = hub_cache_dir() or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        partly = "only partly" if type(exc).__name__ == "IncompleteSnapshotError" else "not"
        missing = error(
            f"{ref.repo_type} {ref} is {partly} in the Hugging Face cache ({where}) and offline mode (HF_HUB_OFFLINE=1"
            f"{' or HF_DATASETS_OFFLINE=1' if ref.repo_type == 'dataset' else ''}) forbids downloading it; fetch it "
            f"once online with `{ref.download_command()}` (or `huggingface-cli download ...`), or run this once "
            "without offline mode")
        missing.hub_missing = partly == "not"
        raise missing from None
    return Snapshot(ref, Path(path), Path(path).name)


def _cached_file_list(ref: HubRef) -> list[str] | None:
    """The repository's file list as the cache recorded it when the snapshot was fetched (recent huggingface_hub
    releases keep it); None when it is not known: the snapshot is then taken as it is."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                                     cache_dir=hub_cache_dir())]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def _download_snapshot(ref: HubRef, choose: Callable[[list[str], str], list[str]],
                       error: type[AlignlineError]) -> Snapshot:
    from huggingface_hub import snapshot_download

    commit, files = _repo_info(ref, error)
    wanted = choose(files, f"{ref.repo_id}@{commit}")
    with _hub_errors(ref, error):
        # the revision as asked, so that the cache records what it points to (refs/) for offline runs
        path = Path(snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                      cache_dir=hub_cache_dir(), allow_patterns=wanted, endpoint=_endpoint()))
    if path.name != commit:
        raise error(f"{ref.repo_type} {ref} moved to a new commit while it was being fetched ({commit} -> "
                    f"{path.name}); run again")
    return Snapshot(ref, path, commit)


class _hub_errors:
    """huggingface_hub's and the network's exceptions as ``error`` with what to do (the token never appears:
    huggingface_hub keeps it out of its messages, and so does this)."""

    def __init__(self, ref: HubRef, error: type[AlignlineError]):
        self.ref, self.error = ref, error

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, AlignlineError) or not isinstance(exc, Exception):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        ref, name = self.ref, f"{self.ref.repo_type} {self.ref}"
        endpoint = _endpoint() or "https://huggingface.co"
        if isinstance(exc, GatedRepoError):
            text = (f"{name} is gated on {endpoint}: accept its conditions on its page, then log in with an account "
                    "that did (`hf auth login`, or set HF_TOKEN)")
        elif isinstance(exc, RepositoryNotFoundError):
            text = (f"{name} was not found on {endpoint}: check the spelling (org/name), or, if it is private, log "
                    "in with an account that can read it (`hf auth login`, or set HF_TOKEN)")
        elif isinstance(exc, RevisionNotFoundError):
            text = f"{name}: revision '{ref.revision}' not found on {endpoint}; give a branch, tag or commit it has"
        elif isinstance(exc, (HfHubHTTPError, OfflineModeIsEnabled, OSError)) or "httpx" in type(exc).__module__:
            text = (f"{name}: could not fetch it from {endpoint} ({type(exc).__name__}: {_first_line(exc)}); check "
                    "the network, or set HF_HUB_OFFLINE=1 to use what is already cached")
        else:
            return False
        raised = self.error(text)
        # no answer at all (not a refusal): what is cached may stand in
        raised.hub_unreachable = not isinstance(exc, HfHubHTTPError)
        raised.hub_missing = isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError)
        raise raised from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"

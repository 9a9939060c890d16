"""What every stage does around its own work: the run directory, skip-if-done, and the manifest."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console

from alignline.config import save_resolved
from alignline.data.datasets_source import hub_dataset_commit, parse_hf_source
from alignline.data.io import fingerprint, read_manifest, write_manifest
from alignline.data.records import Response
from alignline.errors import AlignlineError, DataError, ModelError, PromptTooLongError, TooManyFailuresError
from alignline.hub import hub_commit, parse_hub_id

console = Console(stderr=True, soft_wrap=True)


def input_fingerprint(value: str | Path | None) -> str | None:
    """What identifies an input: a Hub dataset (``hf:...``) or Hub model id by its repository and resolved
    commit (``hf:org/name@<commit>...``, the commit read from the cache when offline); a local file or directory
    by its contents (a Hub cache snapshot by its commit); anything else (an alias, a path not there yet, a name
    the Hub does not know, such as an endpoint's served model) by its text."""
    if not value:
        return None
    text = str(value)
    hub_data = parse_hf_source(text)
    if hub_data is not None:
        return hub_dataset_commit(hub_data)
    if Path(text).exists():
        return fingerprint(text)
    ref = parse_hub_id(text)  # never an alias's spelling: aliases have no '/'
    if ref is not None:
        try:
            return f"hf:{ref.repo_id}@{hub_commit(ref, ModelError)}"
        except ModelError:
            # a served model's name on an OpenAI-compatible endpoint looks the same and is no Hub repository; a
            # model that is loaded fails there with this same error
            pass
    return text


def models_when_set(**models: str | None) -> dict[str, str]:
    """Optional model inputs, only those set: a run without them keeps the fingerprints it always had."""
    return {name: value for name, value in models.items() if value}


def input_fingerprints(inputs: dict[str, str | Path | None]) -> dict[str, str | None]:
    return {k: input_fingerprint(v) for k, v in inputs.items()}


#: Settings left out of every stage's config fingerprint: how to run, not what to compute (an interrupted run
#: and its resumption may differ in them). train.free_memory only changes how freed memory is handed back
#: (the trained weights are bit-identical, tests/test_training.py). train.keep_checkpoints_when_done and tso's
#: keep_versions only decide what a finished run keeps on disk. max_failure_fraction only decides whether a result
#: is accepted, so a run refused under one limit and rerun under a higher one resumes.
ALWAYS_IGNORED = ("resume", "train.stop_after_step", "train.free_memory", "train.keep_checkpoints_when_done",
                  "keep_versions", "max_failure_fraction")
IGNORED_AT_ANY_DEPTH = ("decode_step",)
"""Settings of how, not what, that any engine section may hold (the hf engine's decode step)."""


def _drop_keys(node: Any, names: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        for name in names:
            node.pop(name, None)
        for value in node.values():
            _drop_keys(value, names)
    elif isinstance(node, list):
        for value in node:
            _drop_keys(value, names)


class RunDir:
    """A stage's output directory: knows whether the same config and inputs already completed there, and
    whether what an earlier run left there may be resumed.

    ``fresh`` is True when the directory holds a run (complete, stale or interrupted) of *another* config or
    other inputs: its checkpoints and shards must not be resumed, so stages then train from scratch
    (``resume=False`` clears old checkpoints) and start their shards over (``ShardedWriter(fresh=True)``).
    """

    def __init__(self, stage: str, cfg: BaseModel, out_dir: str | Path, inputs: dict[str, Any],
                 ignore_in_fingerprint: tuple[str, ...] = ()):
        self.stage, self.cfg, self.path = stage, cfg, Path(out_dir)
        body = cfg.model_dump(mode="json")
        for dotted in (*ALWAYS_IGNORED, *ignore_in_fingerprint):  # settings that do not change the result
            *parents, leaf = dotted.split(".")
            node = body
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
        _drop_keys(body, IGNORED_AT_ANY_DEPTH)
        self.config_fp = fingerprint(body)
        self.inputs = {k: str(v) if v is not None else None for k, v in inputs.items()}
        self.inputs_fp = input_fingerprints(inputs)
        # read before any process of this run replaces it (start() writes the "running" manifest)
        self.previous = read_manifest(self.path)
        self.fresh = self.previous is not None and (
            self.previous.get("config_fingerprint") != self.config_fp
            or self.previous.get("input_fingerprints") != self.inputs_fp)

    def skip_if_done(self) -> bool:
        """Whether the same config and inputs already completed here (the stage then has nothing to do: it
        says so and returns)."""
        if self.up_to_date() is None:
            return False
        label = self.stage.replace("eval_", "eval ").replace("_", "-")  # as the command is typed
        console.print(f"[green]{label}: {self.path} is up to date[/green]; nothing to do")
        return True

    def up_to_date(self) -> dict | None:
        m = read_manifest(self.path)
        if m and m.get("status") == "complete" and m.get("stage") == self.stage \
                and m.get("config_fingerprint") == self.config_fp and m.get("input_fingerprints") == self.inputs_fp:
            return m
        return None

    def start(self, wait: Callable[[], None] | None = None) -> None:
        """Mark the run as running (with its fingerprints, so an interrupted run can be told apart from a
        run of other settings) and save the resolved config. Under several processes pass the accelerator's
        ``wait_for_everyone``: every process must have read the previous manifest before it is replaced."""
        self.path.mkdir(parents=True, exist_ok=True)
        if wait is not None:
            wait()
        previous = None
        if self.fresh:
            previous = {k: self.previous.get(k) for k in ("status", "written_at", "config_fingerprint")}
        write_manifest(self.path, stage=self.stage, status="running", config_fingerprint=self.config_fp,
                       input_fingerprints=self.inputs_fp, previous=previous)
        save_resolved(self.cfg, self.path)
        _RUNNING.append(self)

    def fail(self, error: BaseException) -> Path:
        """Mark the run as failed with ``error``'s message; its fingerprints stay, so a rerun of the same
        settings still resumes what it left (checkpoints, shards)."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        return write_manifest(self.path, stage=self.stage, status="failed", error=f"{type(error).__name__}: {error}",
                              config_fingerprint=self.config_fp, input_fingerprints=self.inputs_fp)

    def interrupt(self, signal_name: str) -> Path:
        """Mark the run as interrupted by ``signal_name`` (SIGINT, SIGTERM); its fingerprints stay, so the same
        command resumes it."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        return write_manifest(self.path, stage=self.stage, status="interrupted", signal=signal_name,
                              config_fingerprint=self.config_fp, input_fingerprints=self.inputs_fp)

    def finish(self, counts: Counter | dict | None = None, **extra: Any) -> Path:
        """Write the complete manifest, then remove what the finished run no longer needs: its checkpoints
        (unless train.keep_checkpoints_when_done) and ``extra["dropped"]`` (tso's intermediate versions), listed
        in the manifest's ``dropped``. Every process that trained calls it (they wait for each other there)."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        dropped = list(extra.pop("dropped", []))
        if getattr(getattr(self.cfg, "train", None), "keep_checkpoints_when_done", True) is False:
            from alignline.train.checkpoint import finished_checkpoints

            dropped += finished_checkpoints(self.path)
        path = write_manifest(
            self.path, stage=self.stage, status="complete", config=self.cfg.model_dump(mode="json"),
            config_fingerprint=self.config_fp, inputs=self.inputs, input_fingerprints=self.inputs_fp,
            counts=dict(counts or {}), **extra, **({"dropped": dropped} if dropped else {}),
        )
        if dropped:
            from alignline.train.checkpoint import remove_dropped

            remove_dropped(self.path, dropped, say=lambda text: console.print(f"{self.stage}: {text}"))
        return path


_RUNNING: list[RunDir] = []
"""Runs started (manifest "running") and not yet finished, innermost last."""


@contextmanager
def failures_recorded() -> Iterator[None]:
    """Run a stage so that an error leaves each run it started marked "failed" with the error (not "running"),
    and an interrupt (Ctrl-C, or SIGTERM raised as :class:`~alignline.errors.Interrupted` by the CLI) marked
    "interrupted" with the signal: a rerun resumes them either way."""
    outer = len(_RUNNING)
    try:
        yield
    except Exception as exc:
        while len(_RUNNING) > outer:
            with suppress(OSError, AlignlineError):  # a manifest that cannot be written (a full disk) must not
                _RUNNING[-1].fail(exc)                # hide the error that stopped the stage
        raise
    except KeyboardInterrupt as exc:
        while len(_RUNNING) > outer:
            with suppress(OSError, AlignlineError):
                _RUNNING[-1].interrupt(getattr(exc, "signal_name", "SIGINT"))
        raise
    finally:
        del _RUNNING[outer:]


@contextmanager
def prompts_located(path: str | Path) -> Iterator[None]:
    """A :class:`PromptTooLongError` (which names the prompt by id) raised in the block, re-raised naming the
    prompt's file and line in ``path`` (a prompts file or a directory of shards)."""
    try:
        yield
    except PromptTooLongError as exc:
        from alignline.data.io import adapt_prompt, iter_records
        from alignline.data.records import Prompt

        for file, line, prompt in iter_records(path, Prompt, adapt_prompt):
            if prompt.id == exc.prompt_id:
                raise DataError(exc.bare_message, path=file, line=line, field="messages") from None
        raise


def check_failures(stage: str, failed: int, total: int, limit: float, what: str, where: Path) -> None:
    """A :class:`TooManyFailuresError` when ``failed`` of ``total`` items exceed the ``limit`` fraction."""
    if total and failed / total > limit:
        raise TooManyFailuresError(
            f"{stage}: {failed} of {total} {what} failed ({failed / total:.0%}), more than max_failure_fraction="
            f"{limit:g}; {where} says why. Fix the cause (the judge's endpoint, model or template) and rerun the same "
            "command: it retries the failed ones only (or raise max_failure_fraction to accept the result)")


def seeded_digest(seed: int | str, key: str) -> bytes:
    """sha256 of ``f"{seed}\\x1f{key}"``: a stable draw for ``key`` under ``seed``, independent of order,
    process and ``PYTHONHASHSEED`` (annotate's presentation order, feedback's held-out questions). The other
    seeded hashes each hash their own bytes (stored outputs depend on them): docs/architecture.md lists them."""
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()


def failed_or_empty(r: Response) -> str:
    """The default counter of a skipped response (both reasons in one count)."""
    return "skipped_failed_or_empty_responses"


def iter_usable(responses: Iterable[Response], prompt_ids: Container[str], where: str, counts: Counter,
                skip_key: Callable[[Response], str] = failed_or_empty) -> Iterator[Response]:
    """The usable responses (:attr:`Response.usable`: status ok, non-blank text), in file order. A response
    for a prompt that is not in the prompts file is an error; failed or empty ones are counted under
    ``skip_key(response)`` and skipped."""
    for r in responses:
        if r.prompt_id not in prompt_ids:
            raise DataError(f"response {r.prompt_id}/{r.sample_idx} answers a prompt that is not in the prompts "
                            "file", path=where, field="prompt_id", found=repr(r.prompt_id))
        if r.usable:
            yield r
        else:
            counts[skip_key(r)] += 1


def usable_responses(responses: Iterable[Response], prompt_ids: Container[str], where: str,
                     counts: Counter) -> dict[str, list[Response]]:
    """Each prompt's usable responses (:func:`iter_usable`), by sample index."""
    grouped: dict[str, list[Response]] = defaultdict(list)
    for r in iter_usable(responses, prompt_ids, where, counts):
        grouped[r.prompt_id].append(r)
    return {pid: sorted(rs, key=lambda r: r.sample_idx) for pid, rs in grouped.items()}


# The settings every training stage repeats, each defined once (type, default, description). Aliases rather than
# a shared base class: a base's fields would come first in every dumped config.yaml and --help-config, and some
# stages word these fields' descriptions for themselves (those keep a plain field of type ``Dtype``).
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
TrainingDtype = Annotated[Dtype, Field("auto", description=(
    "auto: float32 master weights on every device (bf16 autocast on GPUs: train.mixed_precision); with lora,\n"
    "the frozen base in bf16 on GPUs that support it. bfloat16 / float16: the weights themselves in that dtype\n"
    "(half the memory, but an update smaller than the weights' precision is lost, e.g. DPO's lr 5e-7)."))]
TrustRemoteCode = Annotated[bool, Field(False, description="Allow model code from the checkpoint directory.")]


def training_dtype(requested: str, lora: object | None = None) -> str:
    """The dtype a training stage loads its model in. ``auto``: float32 master weights on every device (speed on
    GPUs comes from autocast), except with LoRA, where the frozen base keeps ``auto``'s load dtype (bf16 on GPUs
    that support it; PEFT keeps the trained adapters in float32). An explicit dtype is taken as given."""
    if requested != "auto":
        return requested
    return "auto" if lora is not None else "float32"


def stage_tokenizer(model: str, trust_remote_code: bool):
    """(resolved model path, its tokenizer with a chat template)."""
    # imported here: every stage loads this module, and alignline.models pulls in torch
    from alignline.data.chat import ensure_chat_template
    from alignline.models import load_tokenizer, resolve_model

    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    return model_path, tokenizer

"""The ``alignline`` command line: one sub-command per pipeline stage.

Every stage takes an optional YAML config file followed by ``key=value`` overrides (dotted keys reach into
sections, e.g. ``train.lr=1e-5``). ``--help-config`` lists every setting with its default and meaning.
Under several processes run it as ``accelerate launch -m alignline sft CONFIG.yaml``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from alignline.api import set_process_defaults
from alignline.errors import AlignlineError, ConfigError
from alignline.stages.registry import STAGE_BY_TARGET, STAGES, StageSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="alignline: an LLM alignment pipeline (Xwin-LM and TSO papers). Each command is one stage.")
models_app = typer.Typer(no_args_is_help=True, help="Model utilities: GGUF import, aliases.")
app.add_typer(models_app, name="models")
err = Console(stderr=True)

ARGS_HELP = "An optional CONFIG.yaml, then key=value overrides (e.g. train.lr=1e-5 data.max_length=512)."


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def _print_config_help(cls: type[BaseModel]) -> None:
    from alignline.config import describe

    table = Table(title=f"{cls.__name__} settings", show_lines=False)
    for col in ("setting", "default", "meaning"):
        table.add_column(col, overflow="fold")
    from rich.markup import escape

    for name, default, doc in describe(cls):  # docstrings hold [..] lists, not rich markup
        table.add_row(escape(name), escape(default), escape(doc))
    Console().print(table)


def _load(cls, args: list[str], extra: list[str]):
    from alignline.config import load_config

    path, overrides = _split_args(args)
    return load_config(cls, path, overrides + extra)


@contextmanager
def _exit_on_interrupt() -> Iterator[None]:
    """Ctrl-C or SIGTERM (the stages have marked their runs "interrupted"): say so and exit 128 + the signal's
    number (typer would turn any interrupt into exit 130)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        err.print(f"interrupted ({name}); rerun the same command to resume")
        raise typer.Exit(128 + getattr(exc, "signum", signal.SIGINT)) from None


def _stage(cls_path: str, args: list[str], help_config: bool, extra: list[str] | None = None) -> None:
    """The stage whose config class is ``cls_path``: its settings listed, or loaded and the stage run."""
    spec = STAGE_BY_TARGET[cls_path]
    cls, _ = spec.load()
    if help_config:
        _print_config_help(cls)
        return
    with _exit_on_interrupt():
        spec.run(_load(cls, args, extra or []))  # a failed stage's run directory says "failed" and why


RESUME_HELP = "Continue from the newest complete checkpoint (default: yes)."
WAIT_LOCK_HELP = ("When another process is writing the output directory, wait for it to finish instead of stopping "
                  "(also: ALIGNLINE_WAIT_LOCK=1).")


def _wait_for_locks(wait: bool) -> None:
    """--wait-lock: every lock this process takes (its stage's, a pipeline's, sub-stages') waits."""
    if wait:
        from alignline.data.dirlock import WAIT_ENV

        os.environ[WAIT_ENV] = "1"


eval_app = typer.Typer(no_args_is_help=True,
                       help="Evaluation: best-of-n curves, MT-bench, win rate, verifiable instructions, IFEval, judge "
                            "robustness.")
app.add_typer(eval_app, name="eval")


def _register(spec: StageSpec, group: typer.Typer | None = None) -> None:
    """One sub-command per stage: CONFIG.yaml + key=value overrides, --help-config, --wait-lock, optional --resume."""
    cls_path = spec.target  # the command's stage, named by its config class (tests read it from the closure)
    if spec.resumable:
        def command(
            args: list[str] = typer.Argument(None, help=ARGS_HELP),
            resume: bool | None = typer.Option(None, "--resume/--no-resume", help=RESUME_HELP),
            help_config: bool = typer.Option(False, "--help-config", help="List every setting and exit."),
            wait_lock: bool = typer.Option(False, "--wait-lock", help=WAIT_LOCK_HELP),
        ) -> None:
            _wait_for_locks(wait_lock)
            _stage(cls_path, args or [], help_config, [] if resume is None else [f"resume={str(resume).lower()}"])
    else:
        def command(
            args: list[str] = typer.Argument(None, help=ARGS_HELP),
            help_config: bool = typer.Option(False, "--help-config", help="List every setting and exit."),
            wait_lock: bool = typer.Option(False, "--wait-lock", help=WAIT_LOCK_HELP),
        ) -> None:
            _wait_for_locks(wait_lock)
            _stage(cls_path, args or [], help_config)
    command.__doc__ = spec.doc
    (group or app).command(spec.name)(command)


for _spec in STAGES:
    _register(_spec, group=eval_app if _spec.group == "eval" else None)


@app.command("run")
def run_cmd(
    pipeline: Path = typer.Argument(..., help="A pipeline YAML: stages (name, stage, config, overrides), vars, "
                                              "output_root."),
    overrides: list[str] = typer.Argument(None, help="STAGE.setting=value (e.g. sft.train.lr=1e-5), vars.NAME=value, "
                                                     "output_root=DIR."),
    from_stage: str | None = typer.Option(None, "--from", help="Start at this stage; the earlier ones must be complete."),
    only: str | None = typer.Option(None, "--only", help="Run only this stage; the stages it reads must be complete."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved plan; run nothing."),
    report: bool = typer.Option(True, "--report/--no-report", help="Build report.html in the output root at the end."),
    wait_lock: bool = typer.Option(False, "--wait-lock", help=WAIT_LOCK_HELP),
) -> None:
    """Run a pipeline of stages in order; each skips itself when its config and inputs are unchanged."""
    from alignline.pipeline import run_pipeline

    _wait_for_locks(wait_lock)
    with _exit_on_interrupt():
        result = run_pipeline(pipeline, overrides or [], from_stage=from_stage, only=only, dry_run=dry_run,
                              report=report)
    if not result.ok:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    run_dir: Path | None = typer.Argument(None, help="A stage's run directory, or a directory of them."),
    overrides: list[str] = typer.Argument(None, help="key=value settings: output=PATH max_samples=N title=TEXT."),
    help_config: bool = typer.Option(False, "--help-config", help="List every setting and exit."),
) -> None:
    """One self-contained HTML page about a run directory: stages, curves, RM accuracy, best-of-n, samples."""
    from alignline.report.html import ReportConfig, report_cli

    if help_config:
        _print_config_help(ReportConfig)
        return
    if run_dir is None:
        raise ConfigError("give the run directory: alignline report RUN_DIR [output=PATH] [max_samples=N]")
    report_cli(str(run_dir), overrides or [])


@models_app.command("import-gguf")
def import_gguf_cmd(
    gguf: Path = typer.Argument(..., help="A .gguf file."),
    out: Path = typer.Argument(..., help="Output directory for the safetensors HF checkpoint."),
) -> None:
    """Dequantise a GGUF file into a safetensors Hugging Face checkpoint."""
    from alignline.models import import_gguf

    path = import_gguf(gguf, out)
    Console().print(f"imported {gguf} -> {path}")


@models_app.command("resolve")
def resolve_cmd(name: str = typer.Argument(..., help="An alias, a .gguf file, a checkpoint directory or a Hub id "
                                           "(org/name[@revision]).")) -> None:
    """Print the local checkpoint directory a model name resolves to (importing an alias or fetching a Hub id
    once)."""
    from alignline.models import resolve_model

    Console().print(str(resolve_model(name)))


@models_app.command("aliases")
def aliases_cmd() -> None:
    """List the built-in model aliases (offline asset wheels)."""
    from alignline.models import ALIASES

    for name, spec in ALIASES.items():
        Console().print(f"{name}: {spec}")


def main() -> None:
    set_process_defaults()  # the same as the Python API's (alignline.api)
    # a signal the caller ignores (nohup) stays ignored
    stops = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is signal.SIG_DFL]
    for stop_signal in stops:
        signal.signal(stop_signal, _stop)
    try:
        app()
    except AlignlineError as exc:
        err.print(f"[bold red]error:[/bold red] {rich_escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    finally:
        for stop_signal in stops:  # main() called in a process that goes on (tests)
            signal.signal(stop_signal, signal.SIG_DFL)
        _leave_process_group()


def _stop(signum: int, frame) -> None:
    """SIGTERM (or SIGHUP) raised where the program is (as Ctrl-C is), so the stage marks its manifest
    "interrupted" and lets go of its lock; a second one then ends the process at once."""
    signal.signal(signum, signal.SIG_DFL)
    from alignline.errors import Interrupted

    raise Interrupted(signum)


def _leave_process_group() -> None:
    """Under accelerate launch / torchrun: an undestroyed process group can keep a process from exiting
    (seen with FSDP on gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

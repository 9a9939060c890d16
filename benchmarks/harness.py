"""The benchmarks' process harness: every measured configuration in a child process of its own, one after
another, with its own peak RSS, the load other processes put on the machine meanwhile, and a gate that waits
for a quiet machine first.

Every measured configuration runs in its own child process so that its peak resident set size is its own
(``os.wait4`` returns the rusage of exactly that child, unlike ``RUSAGE_CHILDREN``, which is the maximum
over every child reaped so far). Configurations run one after another, never side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GB = 1024**3

#: Environment for benchmark children: fixed thread counts, no network, no tokenizer thread pools.
QUIET_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TQDM": "1",
    "PYTHONUNBUFFERED": "1",
}



def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment plus fixed thread counts (OpenMP/MKL) and :data:`QUIET_ENV`."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.update(extra or {})
    return env


@dataclass
class ChildResult:
    """Outcome of one child process."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    """The child's peak RSS: what it reported itself (:func:`child_main`: VmHWM of its own image), else its
    ``ru_maxrss`` (which on Linux also holds the RSS of this parent at the fork: exec keeps it)."""
    log_path: str
    timed_out: bool = False
    contention: dict[str, float] | None = None
    """CPU used outside this process tree while the child ran (see :class:`CpuMonitor`)."""
    ru_maxrss_bytes: int | None = None
    """The child's ``ru_maxrss`` when ``peak_rss_bytes`` holds what the child reported itself."""

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss_bytes / GB

    def tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])



def run_child(cmd: Sequence[str], *, log_path: str | Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, timeout_s: float | None = None,
              monitor_cpu: bool = True) -> ChildResult:
    """Run ``cmd`` to completion with stdout+stderr going to ``log_path``; measure wall time and peak RSS.

    The child gets its own process group; on timeout the whole group is killed (SIGKILL) and
    ``timed_out`` is set. With ``monitor_cpu``, the CPU that other processes used meanwhile is recorded.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        monitor = CpuMonitor(proc.pid) if monitor_cpu else None
        if monitor is not None:
            monitor.start()
        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            while True:
                try:
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                except InterruptedError:
                    continue
                except KeyboardInterrupt:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise
        finally:
            if timer is not None:
                timer.cancel()
            if monitor is not None:
                monitor.stop()
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4 above; keep Popen from waiting again
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return ChildResult(returncode=code, wall_s=wall, peak_rss_bytes=rss, log_path=str(log_path),
                       timed_out=timed_out.is_set(), contention=monitor.summary() if monitor else None)



class CpuMonitor(threading.Thread):
    """Samples, every ``interval_s``, how many cores were busy outside this process and the child.

    Foreign load = (machine busy CPU time - this process's and the child's CPU time) / elapsed, in cores.
    Whatever else runs on the machine (another test suite, a build) shows up here, so a result that was
    measured while the machine was shared can be flagged.
    """

    def __init__(self, child_pid: int, interval_s: float = 2.0):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.interval = psutil, interval_s
        self.me, self.child_pid = psutil.Process(), child_pid
        self.samples: list[float] = []
        self.steal: list[float] = []
        self._halt = threading.Event()
        self._child_cpu = 0.0

    def _own(self) -> float:
        t = self.me.cpu_times()
        own = t.user + t.system + t.children_user + t.children_system
        try:
            c = self.psutil.Process(self.child_pid).cpu_times()
            self._child_cpu = c.user + c.system + c.children_user + c.children_system
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
            pass  # exited: its time is now in children_* of this process
        return own + self._child_cpu

    def _busy(self) -> tuple[float, float]:
        t = self.psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        steal = getattr(t, "steal", 0.0)
        return sum(t) - idle - steal - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0), steal

    def run(self) -> None:
        busy0, steal0 = self._busy()
        own0, t0 = self._own(), time.monotonic()
        while not self._halt.wait(self.interval):
            busy1, steal1 = self._busy()
            own1, t1 = self._own(), time.monotonic()
            dt = max(t1 - t0, 1e-6)
            self.samples.append(max(0.0, (busy1 - busy0) - (own1 - own0)) / dt)
            self.steal.append(max(0.0, steal1 - steal0) / dt)
            busy0, steal0, own0, t0 = busy1, steal1, own1, t1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def summary(self) -> dict[str, float]:
        s = self.samples or [0.0]
        return {"foreign_cores_mean": round(sum(s) / len(s), 3), "foreign_cores_max": round(max(s), 3),
                "foreign_busy_fraction": round(sum(1 for x in s if x > 0.25) / len(s), 3),
                "steal_cores_mean": round(sum(self.steal) / max(len(self.steal), 1), 3),
                "samples": len(self.samples)}



def _own_tree() -> set[int]:
    import psutil

    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    pids.update(p.pid for p in me.parents())
    return pids



def busy_processes(cpu_threshold: float = 30.0, sample_s: float = 2.0) -> list[dict[str, Any]]:
    """Processes outside this process tree using more than ``cpu_threshold`` % of one core over
    ``sample_s`` seconds (100 = one core busy)."""
    import psutil

    mine = _own_tree()
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid in mine:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cpu >= cpu_threshold:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
            busy.append({"pid": p.pid, "cpu_percent": round(cpu, 1), "cmd": cmd[:160]})
    return busy



def wait_until_quiet(max_wait_s: float = 600.0, poll_s: float = 30.0, cpu_threshold: float = 30.0,
                     log=print) -> dict[str, Any]:
    """Wait (polling every ``poll_s``) until no other process is busy, for at most ``max_wait_s``.

    Returns what was seen: seconds waited, whether the machine was quiet at the end, the busy processes
    at the last check and the load averages (1, 5, 15 min) when the wait ended.
    """
    t0 = time.monotonic()
    while True:
        busy = busy_processes(cpu_threshold)
        waited = time.monotonic() - t0
        if not busy or waited >= max_wait_s:
            break
        names = "; ".join(f"pid {b['pid']} {b['cpu_percent']:.0f}% {b['cmd'][:70]}" for b in busy)
        log(f"  machine busy ({names}); waiting {poll_s:.0f}s ({waited:.0f}/{max_wait_s:.0f}s)")
        time.sleep(min(poll_s, max(1.0, max_wait_s - waited)))
    if busy:
        log(f"  still busy after {waited:.0f}s; running anyway (recorded in the results)")
    return {"waited_s": round(waited, 1), "quiet": not busy, "busy": busy,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}



def is_contended(contention: dict | None, max_foreign_cores: float) -> bool:
    return bool(contention) and contention["foreign_cores_mean"] > max_foreign_cores



def quiet_gate(max_wait_s: float, confirm_s: float = 10.0, log=print) -> dict[str, Any]:
    """``wait_until_quiet``, then a second look ``confirm_s`` later (another benchmark's parent starts its next
    child a few seconds after the previous one ended); at most ``max_wait_s`` in all. ``max_wait_s`` 0: no look."""
    if max_wait_s <= 0:
        return {"waited_s": 0.0, "quiet": None, "busy": [], "loadavg": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()
    while True:
        left = max(0.0, max_wait_s - (time.monotonic() - t0))
        quiet = wait_until_quiet(max_wait_s=left, poll_s=30.0, log=log)
        if not quiet["quiet"]:
            break
        time.sleep(confirm_s)
        busy = busy_processes()
        if not busy or time.monotonic() - t0 >= max_wait_s:
            quiet.update(quiet=not busy, busy=busy)
            break
        log(f"  busy again {confirm_s:.0f}s later ({'; '.join(b['cmd'][:70] for b in busy)}); waiting on")
    quiet["waited_s"] = round(time.monotonic() - t0, 1)
    return quiet



def run_in_child(script: str | Path, name: str, spec: dict, args, work: Path, env: dict[str, str],
                 log=print) -> tuple[dict | None, ChildResult, dict]:
    """Configuration ``name`` of ``script`` in its own child process (``script --child name --spec FILE``), after
    the quiet-machine gate. The child writes its result JSON to ``spec["result"]``; returns (that result or None
    on failure, the child's wall time / peak RSS / load, what the gate saw)."""
    quiet = quiet_gate(args.max_wait, log=log)
    spec = {**spec, "result": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    write_json(spec_path, spec)
    Path(spec["result"]).unlink(missing_ok=True)
    log(f"[{name}] running (load average {quiet['loadavg']}) ...")
    res = run_child([sys.executable, str(Path(script).resolve()), "--child", name, "--spec", str(spec_path)],
                    log_path=work / f"{name}.log", env=env, cwd=Path(__file__).resolve().parent.parent,
                    timeout_s=args.timeout, monitor_cpu=not args.smoke)
    if res.returncode != 0 or not Path(spec["result"]).exists():
        log(f"[{name}] FAILED (rc {res.returncode}{', timed out' if res.timed_out else ''}); log {res.log_path}"
            f"\n{res.tail(30)}")
        return None, res, quiet
    child = json.loads(Path(spec["result"]).read_text())
    res.ru_maxrss_bytes, res.peak_rss_bytes = res.peak_rss_bytes, child.get("own_peak_rss_bytes", res.peak_rss_bytes)
    return child, res, quiet



def child_main(args, sides: dict[str, Any]) -> int:
    """The child side of :func:`run_in_child`: ``sides[name](spec)`` -> result JSON written to spec["result"]."""
    from alignline.telemetry import peak_rss_bytes

    spec = json.loads(Path(args.spec).read_text())
    result = sides[args.child](spec)
    result["own_peak_rss_bytes"] = peak_rss_bytes()  # the parent reads this instead of ru_maxrss
    write_json(spec["result"], result)
    return 0



def measure_rows(names: Sequence[str], run_config, args, *, work: Path, stage_steps=lambda name: None, log=print,
                 after_row=None) -> tuple[list[dict], dict[str, Any]]:
    """``run_config(name, run_dir) -> (row, None) | (None, failure)`` for every configuration, one after another.

    Every attempt gets a run directory no run has used (:func:`fresh_run_dir`), so a stage can never find an
    earlier attempt's complete run there and skip itself. ``stage_steps(name)`` is the number of optimizer steps
    the configuration's alignline stage must run (None for a row without a stage, a peer's): when the stage's
    manifest does not show that it ran them in this attempt (:func:`stage_refusal`), the row is refused: recorded
    in the failures with the reason, no figure kept. A row measured while other processes used more than
    ``--max-foreign-cores`` is measured again (``--retries``) and the least disturbed attempt kept (with
    ``--force-retry``, a test hook: every attempt counts as disturbed and the last one is kept). The run
    directory goes once its attempt is checked (kept with ``--keep-work-dir``). ``after_row(rows, failures)``
    runs after each configuration."""
    rows: list[dict] = []
    failures: dict[str, Any] = {}
    for name in names:
        attempts, refused = [], None
        for attempt in range(1, args.retries + 2):
            run_dir = fresh_run_dir(work, name, attempt)
            started = time.time()
            row, failure = run_config(name, run_dir)
            if failure is None and stage_steps(name) is not None:
                refused = stage_refusal(run_dir, started, stage_steps(name))
            if not args.keep_work_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            if refused is not None:
                log(f"[{name}] attempt {attempt} refused: {refused}")
                failures[name] = {"refused": refused, "attempt": attempt, "run_dir": str(run_dir)}
                break
            if failure is not None:
                failures[name] = failure
                break
            contended = args.force_retry or is_contended(row.get("contention"), args.max_foreign_cores)
            row.update(attempt=attempt, contended=contended, run_dir=str(run_dir))
            attempts.append(row)
            if not contended:
                break
            if attempt <= args.retries:
                load = (row.get("contention") or {}).get("foreign_cores_mean", 0.0)
                log(f"[{name}] other processes used {load:.2f} cores on average while it ran; measuring again "
                    f"(attempt {attempt + 1})")
        if attempts and refused is None:
            rows.append(attempts[-1] if args.force_retry else min(
                attempts, key=lambda r: (r.get("contention") or {}).get("foreign_cores_mean", 0.0)))
        if after_row is not None:
            after_row(rows, failures)
    return rows, failures



def fresh_run_dir(work: Path, name: str, attempt: int) -> Path:
    """An empty directory under ``work/runs`` that no earlier attempt or earlier run (a reused ``--work-dir``) has
    used: the output directory of one attempt of one configuration."""
    runs = Path(work) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-attempt{attempt}-", dir=runs))



def stage_refusal(run_dir: str | Path, started_at: float, steps: int) -> str | None:
    """Why the alignline stage that ran in ``run_dir`` did not do the work being measured, or None when it did.

    A stage that finds a complete run of the same config and inputs in its directory says it is up to date and
    returns without writing anything (``stages.common.RunDir.skip_if_done``): its manifest is then the earlier
    run's, written before this attempt started. So the stage ran when its manifest is ``complete``, was written
    at or after ``started_at`` (a Unix time; the manifest keeps whole seconds) and records ``steps`` optimizer
    steps."""
    from datetime import datetime

    manifest_path = Path(run_dir) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"no readable {manifest_path} ({exc}): the stage did not finish there"
    if manifest.get("status") != "complete":
        return f"{manifest_path} says status {manifest.get('status')!r}, not 'complete'"
    written = datetime.strptime(manifest["written_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    if written < int(started_at):
        return (f"{manifest_path} was written at {manifest['written_at']}, before this attempt started: the stage "
                "found an earlier complete run there and skipped itself")
    if manifest.get("steps") != steps:
        return f"{manifest_path} records {manifest.get('steps')} optimizer steps; the configuration asks for {steps}"
    return None



def failure_of(res: ChildResult) -> dict[str, Any]:
    return {"returncode": res.returncode, "timed_out": res.timed_out, "tail": res.tail(30)}



def new_work_dir(args, prefix: str) -> Path:
    work = args.work_dir or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work



def drop_work_dir(args, work: Path) -> None:
    if not args.keep_work_dir and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path



def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

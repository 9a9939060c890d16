"""Helpers shared by the benchmarks: child processes with peak RSS, a quiet-machine check, result tables.

Every measured configuration runs in its own child process so that its peak resident set size is its own
(``os.wait4`` returns the rusage of exactly that child, unlike ``RUSAGE_CHILDREN``, which is the maximum
over every child reaped so far). Configurations run one after another, never side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
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
    """``ru_maxrss`` of the child (its own high-water mark, including anything it reaped)."""
    log_path: str
    timed_out: bool = False
    contention: dict[str, float] | None = None
    """CPU used outside this process tree while the child ran (see :class:`CpuMonitor`)."""

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


# --------------------------------------------------------------------------- a quiet machine

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


# --------------------------------------------------------------------------- machine and results

def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, for the results file."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "logical_cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma") if f" {f}" in flags]
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / GB, 1)
    except ImportError:
        pass
    versions = {}
    for mod in ("torch", "transformers", "trl", "accelerate", "datasets", "alignline"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # a missing library is just not listed
            continue
    info["versions"] = versions
    return info


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format spec) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


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


class RssSampler(threading.Thread):
    """Peak resident set size per named phase, sampled from /proc/self/statm every ``interval_s``."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.phase, self.peaks = interval_s, "start", {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.timeline: list[tuple[float, str, float]] = []
        self.hwm: dict[str, float] = {}
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def set_phase(self, name: str) -> None:
        self.hwm[f"before {name}"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)
        self.sample()
        self.phase = name
        self.sample()

    def sample(self) -> None:
        r = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
        t = time.perf_counter() - self.t0
        if not self.timeline or t - self.timeline[-1][0] >= 1.0 or self.timeline[-1][1] != self.phase:
            self.timeline.append((round(t, 2), self.phase, round(r / GB, 3)))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=2)
        self.set_phase("end")
        return {"peaks_gb": {k: round(v / GB, 3) for k, v in self.peaks.items()}, "ru_maxrss_gb_at": self.hwm,
                "timeline": self.timeline}


def timed_trl_trainer(trainer_cls: type, sampler: RssSampler, train_batches: list[dict]) -> type:
    """``trainer_cls`` whose training ``compute_loss`` records, per micro-batch, its shape, real tokens, loss,
    forward seconds and RSS after the forward pass into ``train_batches``."""

    class Timed(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t0 = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                fwd = time.perf_counter() - t0
                loss = out[0] if isinstance(out, tuple) else out
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                train_batches.append({"shape": list(ids.shape), "real_tokens": int(mask.sum()),
                                      "loss": float(loss.detach()), "fwd_s": fwd,
                                      "rss_after_fwd_gb": round(sampler.rss() / GB, 3)})
            return out

    return Timed


def trl_step_timer(sampler: RssSampler, timeline: list[dict]):
    """A TrainerCallback appending {t0, t_fb (before the optimizer step), t1} per optimizer step to ``timeline``
    and switching ``sampler`` to the "train" phase."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sampler.set_phase("train")

        def on_step_begin(self, args, state, control, **kw):
            timeline.append({"t0": time.perf_counter()})

        def on_pre_optimizer_step(self, args, state, control, **kw):
            timeline[-1]["t_fb"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timeline[-1]["t1"] = time.perf_counter()

    return StepTimer()

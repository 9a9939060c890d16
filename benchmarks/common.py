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


# --------------------------------------------------------------------------- the shared argument set

#: Every benchmark script accepts ``--smoke``: a tiny random model, a handful of examples, no waiting for a quiet
#: machine, a few seconds per row, peers included where installed. ``tests/test_benchmarks_smoke.py`` runs each
#: script listed in ``SMOKE_SCRIPTS`` that way (``make test``), so an API change that breaks a benchmark fails
#: the tests. Smoke figures measure nothing: they only show that every row still runs.
SMOKE_SCRIPTS = ("sft_throughput.py", "dpo_throughput.py", "rm_throughput.py", "score_throughput.py",
                 "generate_throughput.py", "rl_throughput.py")

#: Benchmark scripts not (yet) in ``SMOKE_SCRIPTS``, with the reason; the smoke test fails for a
#: ``benchmarks/*_throughput.py`` in neither. To be covered, a script must: take the shared arguments
#: (``add_common_args`` + ``finish_args``: ``--smoke``, ``--out``, ``--work-dir``, ...); with ``--smoke``, use
#: ``model_path(args, work)`` (the tiny random model, never a download or the real model's import) and sizes
#: that run in seconds, skip the quiet-machine wait, include its peer rows when the peer is installed; write its
#: result JSON to ``--out`` and exit 0 (non-zero on any failed row). A training benchmark's result also carries
#: ``limit`` (:func:`matmul_limit`) and a positive ``share_of_limit`` in every row of ``results``.
SMOKE_PENDING: dict[str, str] = {}


def add_common_args(p, *, configs: Sequence[str] = (), default_configs: Sequence[str] = (),
                    default_out: Path | None = None, max_wait: float = 600.0, timeout: float = 2400.0) -> None:
    """The arguments every benchmark shares: the mode (``--smoke`` / ``--quick`` / full), threads, seed,
    configurations, result file, work directory, quiet-machine gate, retries and the child-process protocol."""
    import argparse

    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run: a tiny random model and a handful of examples, no quiet-machine wait "
                        "(seconds; figures meaningless)")
    p.add_argument("--quick", action="store_true", help="a short run of the real model (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads in every child (default 2)")
    if configs:
        p.add_argument("--configs", default=None, help=f"comma-separated, from {','.join(configs)} "
                       f"(default {','.join(default_configs)})")
    if default_out is not None:
        p.add_argument("--out", type=Path, help=f"result JSON (default {default_out.name} in benchmarks/results; "
                       "--quick / --smoke: *_quick.json / *_smoke.json)")
    p.add_argument("--model-path", type=Path, help="a checkpoint directory instead of the model alias")
    p.add_argument("--work-dir", type=Path, help="where data and runs go (default: a temporary directory)")
    p.add_argument("--keep-work-dir", action="store_true")
    p.add_argument("--max-wait", type=float, default=max_wait,
                   help=f"seconds to wait for other busy processes before each configuration (default {max_wait:.0f})")
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed per child (default {timeout:.0f})")
    p.add_argument("--retries", type=int, default=None,
                   help="measure a configuration again when other processes used the CPU meanwhile (default 1; "
                        "0 with --smoke)")
    p.add_argument("--max-foreign-cores", type=float, default=0.1,
                   help="mean cores used by other processes above which a measurement counts as contended")
    p.add_argument("--force-retry", action="store_true", help=argparse.SUPPRESS)  # test hook, see measure_rows
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)


def finish_args(args, *, full: dict, quick: dict, smoke: dict, default_out: Path | None = None,
                smoke_configs: Sequence[str] | None = None):
    """Fill the sizes the mode sets (an explicit argument wins), the result file and, for ``--smoke``, the rows
    (``smoke_configs``, TRL rows dropped where TRL is not installed) and no quiet-machine wait or retries (unless
    ``--retries`` is given; ``--force-retry`` asks for at least one)."""
    base = smoke if args.smoke else quick if args.quick else full
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if default_out is not None and getattr(args, "out", None) is None:
        suffix = "_smoke" if args.smoke else "_quick" if args.quick else ""
        args.out = default_out.with_name(default_out.stem + suffix + default_out.suffix)
    if getattr(args, "retries", 0) is None:
        args.retries = 0 if args.smoke else 1
    if getattr(args, "force_retry", False):
        args.retries = max(args.retries, 1)
    if args.smoke:
        args.max_wait = 0.0
        if smoke_configs is not None and getattr(args, "configs", None) is None:
            args.configs = ",".join(c for c in smoke_configs if not c.startswith("trl") or peer_installed("trl"))
    return args


def peer_installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def config_names(args, configs: Sequence[str], default_configs: Sequence[str]) -> list[str]:
    names = args.configs.split(",") if getattr(args, "configs", None) else list(default_configs)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {list(configs)}")
    return names


def smoke_model(work: Path, *, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with alignline's byte-level test tokenizer, saved in ``work``."""
    import torch
    from transformers import LlamaForCausalLM

    from alignline.models import load_tokenizer, make_tiny_tokenizer, save_model, tiny_causal_lm_config

    out = work / "tiny-model"
    if (out / "config.json").exists():
        return out
    make_tiny_tokenizer(work / "tiny-tokenizer")
    tokenizer = load_tokenizer(work / "tiny-tokenizer")
    torch.manual_seed(seed)
    save_model(LlamaForCausalLM(tiny_causal_lm_config(vocab_size=len(tokenizer))), tokenizer, out)
    return out


def model_path(args, work: Path, alias: str = "smollm2-135m-instruct") -> str:
    """``--model-path``, else the tiny model (``--smoke``), else the alias's local checkpoint."""
    if getattr(args, "model_path", None):
        return str(args.model_path)
    if args.smoke:
        return str(smoke_model(work, seed=args.seed))
    from alignline.models import resolve_model

    return str(resolve_model(alias))


# --------------------------------------------------------------------------- the child-process harness

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


# --------------------------------------------------------------------------- what alignline's runs record

def read_run(out_dir: str | Path) -> dict[str, Any]:
    """A finished alignline training run's own figures: per optimizer step (``metrics.jsonl``: seconds, tokens,
    logit positions, useful FLOPs, forward/backward/optimizer seconds, peak memory, loss, units, ...) and the
    manifest's ``phases`` (see ``alignline.telemetry``)."""
    out_dir = Path(out_dir)
    steps = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if "tokens_per_s" in rec:
            steps.append({**rec, "seconds": rec["time/step_s"], "fwd_s": rec["time/forward_s"],
                          "bwd_s": rec["time/backward_s"], "clip_opt_s": rec["time/optimizer_s"],
                          "pairs": int(rec["units"])})
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {"steps": steps, "phases": manifest.get("phases", {}), "counts": manifest.get("counts")}


def step_split(steps: Sequence[dict]) -> dict[str, float]:
    """Forward / backward / clip+optimizer seconds over ``steps`` (either side's per-step records)."""
    return {"forward": sum(s.get("fwd_s", 0.0) for s in steps),
            "backward": sum(s.get("bwd_s", s.get("bwd_clip_s", 0.0)) for s in steps),
            "clip+optimizer": sum(s.get("clip_opt_s", s.get("opt_s", 0.0)) for s in steps)}


# --------------------------------------------------------------------------- the hardware limit

def layer_shapes(config: dict[str, Any], tokens: int) -> dict[str, tuple[int, int, int, float]]:
    """The matmuls of one forward pass of a decoder (Llama-style) over ``tokens`` tokens, as
    name -> (M, K, N, how many per decoder layer); the LM head once per model (1 / layers per layer)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    q = config["num_attention_heads"] * head_dim
    return {"q": (tokens, h, q, 1), "k/v": (tokens, h, kv, 2), "o": (tokens, q, h, 1),
            "gate/up": (tokens, h, i, 2), "down": (tokens, i, h, 1),
            "lm head": (tokens, h, config["vocab_size"], 1 / layers)}


TRIALS = 5


def matmul_limit(config: dict[str, Any], tokens: int, *, device: str = "cpu", threads: int | None = None,
                 seconds: float = 2.0) -> dict[str, Any]:
    """fp32 matmul throughput on the model's own layer shapes (:func:`layer_shapes`), measured now: each shape is
    run for about ``seconds / shapes`` seconds after one warm-up, in ``TRIALS`` trials of which the fastest counts;
    the limit is the whole pass's matmul FLOPs over
    its time at the measured rates (each shape weighted by how often a pass runs it). This is the ceiling for
    the useful-FLOP throughput a training row reports (``share of limit`` = row's / this)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    shapes = layer_shapes(config, tokens)
    by_shape, flops_total, time_total = {}, 0.0, 0.0
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (m, k, n, per_layer) in shapes.items():
        a = torch.randn(m, k, device=dev, generator=g)
        b = torch.randn(k, n, device=dev, generator=g)
        torch.mm(a, b)
        sync()
        rate = 0.0
        for _ in range(TRIALS):  # the best trial: another process taking the CPU for a moment only lowers one
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b)
                reps += 1
                sync()
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / len(shapes) / TRIALS:
                    break
            rate = max(rate, 2.0 * m * k * n * reps / elapsed)
        by_shape[name] = {"shape": [m, k, n], "gflops": round(rate / 1e9, 2)}
        weight = per_layer * config["num_hidden_layers"]
        flops_total += weight * 2.0 * m * k * n
        time_total += weight * 2.0 * m * k * n / rate
    return {"flops_per_s": flops_total / time_total, "gflops": round(flops_total / time_total / 1e9, 2),
            "tokens": tokens, "dtype": "float32", "device": device, "threads": torch.get_num_threads(),
            "by_shape": by_shape}


def share_of_limit(flops: float, seconds: float, limit: dict[str, Any] | None) -> float | None:
    """Useful FLOPs per second over the measured matmul limit (None when either is missing)."""
    if not limit or not seconds or not flops:
        return None
    return flops / seconds / limit["flops_per_s"]


def model_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def measure_limit(args, model_dir: str | Path, tokens: int, *, device: str = "cpu", log=print) -> dict[str, Any]:
    """:func:`matmul_limit` for the benchmark's model at ``tokens`` tokens (a brief probe with ``--smoke``)."""
    limit = matmul_limit(model_config(model_dir), tokens, device=device, threads=args.threads,
                         seconds=0.3 if args.smoke else 4.0)
    log(f"fp32 matmul limit on the model's layer shapes ({tokens} tokens): {limit['gflops']:.1f} GFLOP/s")
    return limit


def percent(share: float | None) -> float | None:
    return None if share is None else 100 * share

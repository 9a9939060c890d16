"""How a TRL peer's child measures itself, with alignline's own instruments (:mod:`alignline.telemetry`): peak
RSS per named phase on telemetry's RSS watch, and each optimizer step timed by telemetry's step clock, laps as
in alignline's training loop (forward = the training ``compute_loss``; backward = the rest of the step before
the optimizer step, clipping included; optimizer = the optimizer step). Imported by the children only: it
imports torch."""

from __future__ import annotations

import resource
import time
from typing import Any

from alignline.telemetry import GB, RssWatch, Telemetry, rss_bytes


class RssSampler(RssWatch):
    """Peak resident set size per named phase, sampled every ``interval_s``, with a timeline (a point a second
    and at each phase change) and the kernel's high-water mark before each phase."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(interval_s)
        self.phase, self.peaks = "start", {}
        self.timeline: list[tuple[float, str, float]] = []
        self.hwm: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def set_phase(self, name: str) -> None:
        self.hwm[f"before {name}"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3)
        self.sample()
        self.phase = name
        self.sample()

    def sample(self) -> None:
        r = rss_bytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), r)
        t = time.perf_counter() - self.t0
        if not self.timeline or t - self.timeline[-1][0] >= 1.0 or self.timeline[-1][1] != self.phase:
            self.timeline.append((round(t, 2), self.phase, round(r / GB, 3)))

    def stop(self) -> dict:
        self.halt.set()
        self.join(timeout=2)
        self.set_phase("end")
        return {"peaks_gb": {k: round(v / GB, 3) for k, v in self.peaks.items()}, "ru_maxrss_gb_at": self.hwm,
                "timeline": self.timeline}


class TrlClock:
    """Per optimizer step of a TRL trainer, :meth:`StepClock.record <alignline.telemetry.StepClock.record>`
    (``time/forward_s``, ``time/backward_s``, ``time/optimizer_s``, ``time/step_s``, ``mem/...``) in ``steps``;
    per training micro-batch (with :meth:`trainer`), its shape, real tokens, loss and RSS after the forward
    pass in ``batches``. ``sampler`` (optional) switches to the "train" phase when training starts."""

    def __init__(self, sampler: RssSampler | None = None):
        self.tel, self.sampler = Telemetry(), sampler
        self.clock = None
        self.steps: list[dict[str, float]] = []
        self.batches: list[dict[str, Any]] = []

    def trainer(self, trainer_cls: type) -> type:
        """``trainer_cls`` whose training ``compute_loss`` is the step's forward lap."""
        owner = self

        class Timed(trainer_cls):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if not model.training or owner.clock is None:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                owner.clock.lap("backward")  # the step's time before this forward is not forward time
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                owner.clock.lap("forward")
                loss = out[0] if isinstance(out, tuple) else out
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                owner.batches.append({"shape": list(ids.shape), "real_tokens": int(mask.sum()),
                                      "loss": float(loss.detach()), "rss_after_fwd_gb": round(rss_bytes() / GB, 3)})
                return out

        return Timed

    def callback(self):
        """The TrainerCallback that opens, laps and records the clock of every optimizer step."""
        from transformers import TrainerCallback

        owner = self

        class StepLaps(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if owner.sampler is not None:
                    owner.sampler.set_phase("train")

            def on_step_begin(self, args, state, control, **kw):
                owner.clock = owner.tel.step_clock()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                owner.clock.lap("backward")

            def on_step_end(self, args, state, control, **kw):
                owner.clock.lap("optimizer")
                owner.steps.append(owner.clock.record())
                owner.clock = None

        return StepLaps()


def step_times(clock: dict[str, float]) -> dict[str, float]:
    """A TRL step's clock record under the names the benchmarks report: seconds, forward, backward + clipping,
    optimizer."""
    return {"seconds": clock["time/step_s"], "fwd_s": clock.get("time/forward_s", 0.0),
            "bwd_clip_s": clock.get("time/backward_s", 0.0), "opt_s": clock.get("time/optimizer_s", 0.0)}

"""Progress displays of ``greensweep run``: plain lines off a terminal, a live display on
one, and the estimate of the time left. Driven with fake coordinator events."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from orchestrator.plan import PlannedStage
from orchestrator.progress import (
    LineProgress,
    LiveProgress,
    estimate_remaining,
    format_duration,
    is_interactive,
    make_progress,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")

# train -> {prune 0.3, prune 0.6}; each of the three models evaluated on "cpu".
STAGES = (
    PlannedStage("k-train", "train", {}, None, "train(epochs=5)"),
    PlannedStage("k-p3", "prune", {}, "k-train", "prune(ratio=0.3)"),
    PlannedStage("k-p6", "prune", {}, "k-train", "prune(ratio=0.6)"),
    PlannedStage("k-e0", "evaluate", {}, "k-train", "evaluate(cpu)", target="cpu"),
    PlannedStage("k-e3", "evaluate", {}, "k-p3", "evaluate(cpu)", target="cpu"),
    PlannedStage("k-e6", "evaluate", {}, "k-p6", "evaluate(cpu)", target="cpu"),
)
PLAN = SimpleNamespace(stages=STAGES)
BY_KEY = {s.key: s for s in STAGES}
NODE_A = SimpleNamespace(node_id="aaaaaaaa11112222", node_type="cpu-xeon")
NODE_B = SimpleNamespace(node_id="bbbbbbbb33334444", node_type="cpu-epyc")


def ok(key: str, duration_s: float, **metrics) -> SimpleNamespace:
    return SimpleNamespace(status="succeeded", duration_s=duration_s, metrics=metrics, error=None)


def failed(error: str) -> SimpleNamespace:
    return SimpleNamespace(status="failed", duration_s=0.0, metrics={}, error=error)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def text_of(renderable, width: int = 160) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


# -- plain lines ---------------------------------------------------------------------------


def test_non_terminal_stream_gets_plain_lines_for_every_event():
    out = io.StringIO()
    p = make_progress(PLAN, stream=out)
    assert isinstance(p, LineProgress)
    s = BY_KEY
    p.stage_started(s["k-train"], NODE_A)
    p.stage_progress(s["k-train"], {"epoch": 2, "epochs": 5, "train_loss": 1.25})
    p.stage_finished(s["k-train"], ok("k-train", 12.34, best_val_top1=0.9, best_epoch=4), 1, 6)
    p.stage_reused(s["k-p3"], 2, 6)
    p.stage_retrying(s["k-p6"], NODE_B, 2, "worker on node bbbbbbbb (cpu-epyc) died during the stage")
    p.stage_requeued(s["k-p6"], "node left the cluster")
    p.stage_finished(s["k-p6"], failed("out of memory [CUDA]"), 3, 6)
    p.stage_skipped(s["k-e6"], "parent failed")
    p.warning("no carbon figure for prune(ratio=0.3)")
    p.stage_waiting(s["k-p3"], "planned start 2026-11-23 04:00 UTC on cpu-xeon/FR, expected 1.2 g CO2")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "           start   train(epochs=5)  [on cpu-xeon aaaaaaaa]",
        "           ...     train(epochs=5)  epoch 2/5  loss 1.250",
        "[  1/  6] done    train(epochs=5)  12.3s  val top1 90.0% (best epoch 4)",
        "[  2/  6] reused  prune(ratio=0.3)  (artifact k-p3 exists)",
        "           retry   prune(ratio=0.6)  attempt 2: worker on node bbbbbbbb (cpu-epyc) died during the stage",
        "           requeue prune(ratio=0.6)  (node left the cluster)",
        "[  3/  6] FAILED  prune(ratio=0.6)  out of memory [CUDA]",
        "           skipped evaluate(cpu) of prune(ratio=0.6)  (a parent stage failed)",
        "warning: no carbon figure for prune(ratio=0.3)",
        "           waits   prune(ratio=0.3)  for a cleaner window: planned start 2026-11-23 04:00 UTC on "
        "cpu-xeon/FR, expected 1.2 g CO2",
    ]
    assert not ANSI.search(out.getvalue())


def test_a_mixed_precision_training_says_its_precision_when_done():
    out = io.StringIO()
    p = make_progress(PLAN, stream=out)
    p.stage_finished(BY_KEY["k-train"], ok("k-train", 2.0, best_val_top1=0.9, best_epoch=4, precision="bf16"), 1, 6)
    p.stage_finished(BY_KEY["k-train"], ok("k-train", 2.0, best_val_top1=0.9, best_epoch=4, precision="fp32"), 1, 6)
    p.close()
    assert out.getvalue().splitlines() == [
        "[  1/  6] done    train(epochs=5)  2.0s  val top1 90.0% (best epoch 4, bf16)",
        "[  1/  6] done    train(epochs=5)  2.0s  val top1 90.0% (best epoch 4)",
    ]


def test_auto_mode_picks_the_display_from_the_stream(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    assert is_interactive(TTY()) and not is_interactive(io.StringIO())
    live = make_progress(PLAN, stream=TTY())
    try:
        assert isinstance(live, LiveProgress)
    finally:
        live.close()
    assert isinstance(make_progress(PLAN, stream=TTY(), live=False), LineProgress)  # --progress plain
    forced = make_progress(PLAN, stream=io.StringIO(), live=True)  # --progress live into a pipe
    try:
        assert isinstance(forced, LiveProgress) and forced.console.is_terminal
    finally:
        forced.close()
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(make_progress(PLAN, stream=TTY()), LineProgress)


# -- time left -----------------------------------------------------------------------------


def test_estimate_uses_the_mean_duration_per_kind_and_the_workers():
    est = estimate_remaining(
        pending_kinds=["prune", "evaluate", "evaluate"],
        running=[("prune", 5.0), ("evaluate", 30.0)],  # the evaluation has overrun its mean
        durations_s={"prune": [10.0, 30.0], "evaluate": [4.0, 6.0]},
        workers=2,
    )
    # pending 20 + 5 + 5, running (20 - 5) + max(0, 5 - 30): 45 s of work on 2 workers
    assert est.remaining_s == pytest.approx(22.5) and est.complete


def test_estimate_names_kinds_without_a_timing():
    est = estimate_remaining(["quantize", "evaluate"], [("distill", 3.0)], {"evaluate": [8.0]}, workers=1)
    assert est.remaining_s == pytest.approx(8.0)
    assert est.untimed_kinds == ("distill", "quantize") and not est.complete


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


# -- live display --------------------------------------------------------------------------


def drive_to_mid_sweep(p: LiveProgress, clock: FakeClock) -> None:
    """t=0..140 s: train (100 s), an evaluation (10 s) and a prune (30 s) finish;
    another prune and an evaluation are running; one evaluation is pending."""
    s = BY_KEY
    p.stage_started(s["k-train"], NODE_A)
    clock.now += 100
    p.stage_finished(s["k-train"], ok("k-train", 100.0), 1, 6)
    p.stage_started(s["k-e0"], NODE_A)
    p.stage_started(s["k-p3"], NODE_B)
    clock.now += 10
    p.stage_finished(s["k-e0"], ok("k-e0", 10.0, top1=0.9, time_per_sample_s=1e-4), 2, 6)
    clock.now += 20
    p.stage_finished(s["k-p3"], ok("k-p3", 30.0), 3, 6)
    p.stage_started(s["k-p6"], NODE_A)
    p.stage_started(s["k-e3"], NODE_B)
    p.stage_progress(s["k-p6"], {"epoch": 2, "epochs": 5, "train_loss": 0.5})
    clock.now += 10


def test_live_display_renders_counts_nodes_elapsed_and_eta():
    clock = FakeClock()
    p = LiveProgress(PLAN, console=Console(file=io.StringIO(), width=160), clock=clock)
    try:
        drive_to_mid_sweep(p, clock)
        assert p.counts() == {"done": 3, "reused": 0, "running": 2, "pending": 1, "failed": 0, "skipped": 0,
                              "total": 6}
        text = text_of(p.render())
    finally:
        p.close()
    assert "done 3/6" in text and "running 2" in text and "pending 1" in text and "failed 0" in text
    assert "elapsed 2m20s" in text and "50% finished" in text
    assert re.search(r"node\s+stage\s+running for\s+progress", text)  # the whole header, on its own line
    # means: evaluate 10 s, prune 30 s. Left: pending evaluation 10 + running prune 30 - 10
    # + running evaluation 10 - 10 = 30 s of work on 2 nodes.
    assert "ETA ~15s" in text
    row_a = next(line for line in text.splitlines() if "cpu-xeon aaaaaaaa" in line)
    assert "prune(ratio=0.6)" in row_a and "10s" in row_a and "epoch 2/5" in row_a
    row_b = next(line for line in text.splitlines() if "cpu-epyc bbbbbbbb" in line)
    assert "evaluate(cpu) of prune(ratio=0.3)" in row_b


def test_live_display_before_any_timing_says_it_is_estimating():
    clock = FakeClock()
    p = LiveProgress(PLAN, console=Console(file=io.StringIO(), width=160), clock=clock)
    try:
        p.stage_started(BY_KEY["k-train"], NODE_A)
        clock.now += 5
        text = text_of(p.render())
    finally:
        p.close()
    assert "ETA estimating (no stage finished yet)" in text and "done 0/6" in text and "running 1" in text
    assert re.search(r"cpu-xeon aaaaaaaa\s+train\(epochs=5\)\s+5s", text)


def test_live_eta_is_a_lower_bound_while_a_kind_has_no_timing():
    clock = FakeClock()
    p = LiveProgress(PLAN, console=Console(file=io.StringIO(), width=160), clock=clock)
    try:
        p.stage_started(BY_KEY["k-train"], NODE_A)
        clock.now += 100
        p.stage_finished(BY_KEY["k-train"], ok("k-train", 100.0), 1, 6)
        p.stage_started(BY_KEY["k-p3"], NODE_A)
        clock.now += 30
        p.stage_started(BY_KEY["k-p6"], NODE_B)
        early = text_of(p.render())
        clock.now += 30
        p.stage_finished(BY_KEY["k-p3"], ok("k-p3", 60.0), 2, 6)
        p.stage_started(BY_KEY["k-e0"], NODE_A)
        later = text_of(p.render())
        clock.now += 30
        latest = text_of(p.render())
    finally:
        p.close()
    # prunes and evaluations untimed: the train's mean says nothing about them
    assert "ETA estimating (no evaluate, prune stage finished yet)" in early
    # the other prune has run 30 s of its kind's 60 s, on 2 nodes; evaluations untimed
    assert "ETA >= 15s (no evaluate stage finished yet)" in later
    assert "ETA estimating (no evaluate stage finished yet)" in latest  # the prune is due now


def test_resumed_sweep_counts_its_finished_stages_as_done():
    p = LiveProgress(PLAN, console=Console(file=io.StringIO(), width=160), clock=FakeClock(),
                     initial_status={"k-train": "succeeded", "k-p3": "reused", "k-e0": "succeeded"})
    try:
        text = text_of(p.render())
    finally:
        p.close()
    assert "done 3/6 (1 reused)" in text and "pending 3" in text and "50% finished" in text


def test_forced_terminal_live_output_keeps_failures_above_the_final_table():
    clock = FakeClock()
    out = io.StringIO()
    p = LiveProgress(PLAN, console=Console(file=out, width=160, force_terminal=True), clock=clock,
                     refresh_per_second=20)
    drive_to_mid_sweep(p, clock)
    p.stage_finished(BY_KEY["k-p6"], failed("loss diverged [nan]"), 4, 6)
    p.stage_skipped(BY_KEY["k-e6"], "parent failed")
    p.warning("region 'local' has no intensity data")
    p.stage_waiting(BY_KEY["k-p3"], "planned start 04:00 UTC")
    p.stage_retrying(BY_KEY["k-e3"], NODE_B, 2, "node bbbbbbbb (cpu-epyc) left the cluster")
    p.stage_started(BY_KEY["k-e3"], NODE_A)
    p.close()
    p.close()  # idempotent
    raw = out.getvalue()
    assert "\x1b[" in raw  # a terminal display: cursor moves and styles
    text = ANSI.sub("", raw)
    final = text.rindex("done 3/6")
    for persisted in ("FAILED  prune(ratio=0.6)  loss diverged [nan]",
                      "warning: region 'local' has no intensity data",
                      "waits   prune(ratio=0.3)  for a cleaner window: planned start 04:00 UTC",
                      "retry   evaluate(cpu) of prune(ratio=0.3)  attempt 2: node bbbbbbbb (cpu-epyc) left the "
                      "cluster"):
        assert 0 <= text.index(persisted) < final
    tail = text[final:]
    assert re.search(r"\n\s*node\s+stage\s+running for\s+progress\s*\n", tail)
    assert "running 1" in tail and "pending 0" in tail and "failed 1" in tail and "skipped 1" in tail
    assert "ETA ~5s" in tail  # the retried evaluation restarted: its kind's mean, 10 s, on 2 nodes
    assert re.search(r"cpu-epyc bbbbbbbb\s+idle", tail)


# -- the CLI -------------------------------------------------------------------------------


def test_run_progress_option_is_validated(capsys, tmp_path, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["run", "spec.yaml", "--progress", "fancy"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'fancy' is not one of 'auto', 'live', 'plain'" in err

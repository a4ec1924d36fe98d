"""What ``greensweep run`` shows while a sweep runs.

Two implementations of the coordinator's ``Progress`` protocol
(:class:`orchestrator.coordinator.Progress`):

* :class:`LineProgress` -- one plain line per event; fit for pipes, CI logs and files.
* :class:`LiveProgress` -- a rich live display for terminals: counts of stages done /
  running / pending / failed / skipped, one row per node with the stage it runs and for
  how long, the elapsed time and an estimate of the time left. Warnings, failures,
  retries and requeues are printed above the live area, so they stay on screen.

:func:`make_progress` picks one: the live display when the output stream is an
interactive terminal, plain lines otherwise. Both are closed with :meth:`close` when the
run ends (the live display then leaves its final state on screen).

Events arrive from the coordinator's thread; the live display redraws from its own
thread, so its state is guarded by a lock that is never held while printing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

#: Stage states the live display counts as done.
_FINISHED_OK = ("succeeded", "reused")


def _role(kind: str) -> str | None:
    """The kind's registered role (None for a kind this coordinator does not know)."""
    from workers.stages.registry import find_kind

    known = find_kind(kind)
    return known.role if known is not None else None


def stage_names(plan: Any) -> dict[str, str]:
    """A readable name per stage key, naming each stage by its chain, e.g.
    ``evaluate(local) of prune(...) > quantize(...)``, so a line says which sweep point
    it belongs to. The baseline ``train`` stage maps to ``""`` (chains are named from the
    first compression); callers fall back to the stage's label."""
    names: dict[str, str] = {}
    for st in plan.stages:  # parents come first
        parent = names.get(st.parent_key, "") if st.parent_key else ""
        role = _role(st.kind)
        if role == "baseline":
            names[st.key] = ""
        elif role == "evaluation":
            names[st.key] = f"{st.label} of {parent or 'the baseline'}"
        else:
            names[st.key] = f"{parent} > {st.label}" if parent else st.label
    return names


def _progress_text(report: Mapping[str, Any]) -> str:
    """One progress report (e.g. a training epoch) as a short phrase."""
    parts = []
    if "epoch" in report:
        total = report.get("epochs")
        parts.append(f"epoch {report['epoch']}" + (f"/{total}" if total else ""))
    for key, fmt in (("train_loss", "loss {:.3f}"), ("val_top1", "val top1 {:.1%}"), ("epoch_s", "{:.1f}s")):
        if report.get(key) is not None:
            parts.append(fmt.format(report[key]))
    return "  ".join(parts) or str(dict(report))


def _summary(kind: str, m: Mapping[str, Any]) -> str:
    """A finished stage's headline metric, e.g. ``top1 97.2%  0.031 ms/sample``."""
    if _role(kind) == "evaluation" and m.get("top1") is not None:
        return f"top1 {100 * m['top1']:.1f}%  {1e3 * m.get('time_per_sample_s', 0):.3f} ms/sample"
    if m.get("best_val_top1") is not None:
        before = f"{100 * m['initial_val_top1']:.1f}% -> " if m.get("initial_val_top1") is not None else ""
        mixed = f", {m['precision']}" if m.get("precision") not in (None, "fp32") else ""  # the loop's autocast
        return f"val top1 {before}{100 * m['best_val_top1']:.1f}% (best epoch {m.get('best_epoch')}{mixed})"
    if "params_after" in m:
        return f"params {m['params_before']:,} -> {m['params_after']:,}"
    if "sparsity" in m:
        return f"sparsity {100 * m['sparsity']:.1f}%"
    return ""


def _node_text(node: Any) -> str:
    """A node as ``<type> <id prefix>``; accepts a NodeInfo, a bare node id or None."""
    if node is None:
        return "unknown node"
    if isinstance(node, str):
        return node[:8]
    node_type = getattr(node, "node_type", None)
    node_id = str(getattr(node, "node_id", "") or "")[:8]
    return " ".join(p for p in (node_type, node_id) if p) or "unknown node"


def _node_id(node: Any) -> str:
    if node is None:
        return "?"
    return node if isinstance(node, str) else str(getattr(node, "node_id", "?"))


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a table cell."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# -- plain lines ---------------------------------------------------------------------------


class LineProgress:
    """Plain progress lines (one per event), fit for terminals, pipes and CI logs.

    Each stage is named by its chain (see :func:`stage_names`). Lines go to *stream*
    (default: standard output at the time of writing).
    """

    def __init__(self, plan: Any, *, stream: IO[str] | None = None) -> None:
        self.names = stage_names(plan)
        self.stream = stream

    def _name(self, stage: Any) -> str:
        return self.names.get(stage.key) or stage.label

    def _echo(self, line: str) -> None:
        click.echo(line, file=self.stream)

    def stage_started(self, stage: Any, node: Any) -> None:
        self._echo(f"           start   {self._name(stage)}  [on {_node_text(node)}]")

    def stage_finished(self, stage: Any, result: Any, done: int, total: int) -> None:
        if result.status == "succeeded":
            extra = _summary(stage.kind, result.metrics)
            self._echo(f"[{done:3d}/{total:3d}] done    {self._name(stage)}  {result.duration_s:.1f}s  {extra}")
        else:
            self._echo(f"[{done:3d}/{total:3d}] FAILED  {self._name(stage)}  {result.error}")

    def stage_reused(self, stage: Any, done: int, total: int) -> None:
        self._echo(f"[{done:3d}/{total:3d}] reused  {self._name(stage)}  (artifact {stage.key[:12]} exists)")

    def stage_skipped(self, stage: Any, reason: str) -> None:
        from orchestrator.gate import decided_skip

        why = reason if decided_skip(reason) else "a parent stage failed"
        self._echo(f"           skipped {self._name(stage)}  ({why})")

    def stage_progress(self, stage: Any, report: dict[str, Any]) -> None:
        self._echo(f"           ...     {self._name(stage)}  {_progress_text(report)}")

    def stage_retrying(self, stage: Any, node: Any, attempt: int, reason: str) -> None:
        """The stage's attempt on *node* was lost; attempt number *attempt* is queued.
        (The coordinator's *reason* names the node.)"""
        self._echo(f"           retry   {self._name(stage)}  attempt {attempt}: {reason}")

    def stage_requeued(self, stage: Any, reason: str) -> None:
        self._echo(f"           requeue {self._name(stage)}  ({reason})")

    def stage_waiting(self, stage: Any, note: str) -> None:
        """Carbon-aware placement holds the ready stage back for a cleaner window."""
        self._echo(f"           waits   {self._name(stage)}  for a cleaner window: {note}")

    def warning(self, message: str) -> None:
        self._echo(f"warning: {message}")

    def close(self) -> None:
        """Nothing to stop; flushes the stream so a pipe sees every line."""
        stream = self.stream or sys.stdout
        flush = getattr(stream, "flush", None)
        if flush is not None:
            flush()


# -- time left -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """The time a sweep still needs, from the mean duration of each stage kind so far.

    ``remaining_s`` covers the stages whose kind has a timing (work left divided by the
    *workers* running in parallel); ``untimed_kinds`` are kinds with stages still to run
    but none finished yet, so the true figure is at least ``remaining_s``.
    """

    remaining_s: float
    untimed_kinds: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.untimed_kinds


def estimate_remaining(
    pending_kinds: Iterable[str],
    running: Iterable[tuple[str, float]],
    durations_s: Mapping[str, list[float]],
    workers: int,
) -> Estimate:
    """Estimate the wall time left.

    *pending_kinds* has one kind per stage not started yet; *running* one
    ``(kind, seconds it has run)`` per running stage; *durations_s* the durations of
    stages that finished, by kind. A pending stage is expected to take its kind's mean;
    a running one its kind's mean minus what it has already run (never below 0). The sum
    is divided by *workers* (stages run in parallel, one per worker): a rough figure,
    since evaluations are pinned to their target's nodes.
    """
    means = {k: sum(v) / len(v) for k, v in durations_s.items() if v}
    work_s = 0.0
    untimed: set[str] = set()
    for kind in pending_kinds:
        if kind in means:
            work_s += means[kind]
        else:
            untimed.add(kind)
    for kind, ran_s in running:
        if kind in means:
            work_s += max(0.0, means[kind] - ran_s)
        else:
            untimed.add(kind)
    return Estimate(remaining_s=work_s / max(1, workers), untimed_kinds=tuple(sorted(untimed)))


# -- live display --------------------------------------------------------------------------


@dataclass
class _Running:
    kind: str
    node_id: str
    started: float  # clock() when it started
    note: str = ""  # the latest progress report, as text


class LiveProgress:
    """A rich live display of a running sweep, redrawn a few times a second.

    Shows counts (done -- succeeded or reused --, running, pending, failed, skipped), a
    bar, one row per node with its current stage and how long it has run (``idle`` when
    it has none), the elapsed time and an estimate of the time left (see
    :func:`estimate_remaining`). Failures, warnings, retries and requeues are printed
    above the live area and persist. Output is captured from the moment the display is
    built until :meth:`close`; anything else printed meanwhile also appears above it.

    *initial_status* (a resumed sweep) maps stages already done to ``succeeded`` or
    ``reused``. *clock* (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self,
        plan: Any,
        *,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_per_second: float = 4.0,
        initial_status: Mapping[str, str] | None = None,
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        self.names = stage_names(plan)
        self.labels = {s.key: s.label for s in plan.stages}
        self.kinds = {s.key: s.kind for s in plan.stages}
        self.states: dict[str, str] = {s.key: "pending" for s in plan.stages}
        for key, status in (initial_status or {}).items():  # a resumed sweep's finished stages
            if key in self.states:
                self.states[key] = status
        self.running: dict[str, _Running] = {}
        self.nodes: dict[str, str] = {}  # node id -> "<type> <id prefix>", in the order first seen
        self.durations_s: dict[str, list[float]] = {}
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()  # guards the state above; never held while printing
        self.console = console if console is not None else Console()
        self._live = Live(
            console=self.console,
            get_renderable=self.render,
            refresh_per_second=refresh_per_second,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._closed = False
        self._live.start()

    # -- events (coordinator thread) -------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.names.get(key) or self.labels.get(key) or key[:12]

    def _track(self, stage: Any) -> None:
        """Stages the plan did not list (should not happen) are tracked from first sight."""
        if stage.key not in self.states:
            self.states[stage.key] = "pending"
            self.kinds[stage.key] = stage.kind
            self.labels[stage.key] = getattr(stage, "label", stage.key[:12])

    def stage_started(self, stage: Any, node: Any) -> None:
        with self._lock:
            self._track(stage)
            node_id = _node_id(node)
            self.nodes.setdefault(node_id, _node_text(node))
            self.states[stage.key] = "running"
            self.running[stage.key] = _Running(stage.kind, node_id, self._clock())
        self._redraw()

    def stage_finished(self, stage: Any, result: Any, done: int, total: int) -> None:
        ok = result.status == "succeeded"
        with self._lock:
            self._track(stage)
            self.running.pop(stage.key, None)
            self.states[stage.key] = "succeeded" if ok else "failed"
            if ok and result.duration_s and result.duration_s > 0:
                self.durations_s.setdefault(stage.kind, []).append(float(result.duration_s))
        self._redraw()
        if not ok:
            self._print_above(("FAILED  ", "bold red"), self._name(stage.key), f"  {result.error}")

    def stage_reused(self, stage: Any, done: int, total: int) -> None:
        with self._lock:
            self._track(stage)
            self.states[stage.key] = "reused"
        self._redraw()

    def stage_skipped(self, stage: Any, reason: str) -> None:
        with self._lock:
            self._track(stage)
            self.running.pop(stage.key, None)
            self.states[stage.key] = "skipped"
        self._redraw()

    def stage_progress(self, stage: Any, report: dict[str, Any]) -> None:
        with self._lock:
            run = self.running.get(stage.key)
            if run is not None:
                run.note = _progress_text(report)
        self._redraw()

    def stage_retrying(self, stage: Any, node: Any, attempt: int, reason: str) -> None:
        self._back_to_pending(stage)
        self._print_above(("retry   ", "yellow"), self._name(stage.key), f"  attempt {attempt}: {reason}")

    def stage_requeued(self, stage: Any, reason: str) -> None:
        self._back_to_pending(stage)
        self._print_above(("requeue ", "yellow"), self._name(stage.key), f"  ({reason})")

    def stage_waiting(self, stage: Any, note: str) -> None:
        self._print_above(("waits   ", "cyan"), self._name(stage.key), f"  for a cleaner window: {note}")

    def warning(self, message: str) -> None:
        self._print_above(("warning: ", "yellow"), message)

    def close(self) -> None:
        """Stop redrawing; the final state stays on screen. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._live.stop()

    def _back_to_pending(self, stage: Any) -> None:
        with self._lock:
            self._track(stage)
            self.running.pop(stage.key, None)
            self.states[stage.key] = "pending"
        self._redraw()

    def _print_above(self, *parts: str | tuple[str, str]) -> None:
        from rich.text import Text

        # Text, not markup: stage names and errors may contain brackets.
        self.console.print(Text.assemble(*parts), soft_wrap=True)

    def _redraw(self) -> None:
        """Redraw now (the refresh thread also redraws a few times a second), so the live
        area is current when a line is printed above it. Never called holding the lock."""
        if not self._closed:
            self._live.refresh()

    # -- drawing (refresh thread) ----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Stages per display state: done (succeeded or reused), reused, running,
        pending, failed, skipped, and the total."""
        with self._lock:
            states = list(self.states.values())
        return {
            "done": sum(s in _FINISHED_OK for s in states),
            "reused": states.count("reused"),
            "running": states.count("running"),
            "pending": states.count("pending"),
            "failed": states.count("failed"),
            "skipped": states.count("skipped"),
            "total": len(states),
        }

    def estimate(self) -> Estimate:
        now = self._clock()
        with self._lock:
            pending = [self.kinds[k] for k, s in self.states.items() if s == "pending"]
            running = [(r.kind, now - r.started) for r in self.running.values()]
            durations = {k: list(v) for k, v in self.durations_s.items()}
            workers = max(len(self.nodes), len(self.running), 1)
        return estimate_remaining(pending, running, durations, workers)

    def render(self) -> RenderableType:
        """The live area: counts and times, a bar, and the node table."""
        from rich import box
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        c = self.counts()
        now = self._clock()
        with self._lock:
            rows_by_node: dict[str, list[tuple[str, _Running]]] = {n: [] for n in self.nodes}
            for key, run in self.running.items():
                rows_by_node.setdefault(run.node_id, []).append((key, _Running(**vars(run))))
            node_labels = dict(self.nodes)

        finished = c["done"] + c["failed"] + c["skipped"]
        reused = f" ({c['reused']} reused)" if c["reused"] else ""
        line = Text.assemble(
            ("done ", "bold"), f"{c['done']}/{c['total']}{reused}   ",
            ("running ", "bold"), f"{c['running']}   ",
            ("pending ", "bold"), f"{c['pending']}   ",
            ("failed ", "bold red" if c["failed"] else "bold"), f"{c['failed']}   ",
            ("skipped ", "bold"), f"{c['skipped']}   ",
            ("elapsed ", "bold"), format_duration(now - self._started), "   ",
            ("ETA ", "bold"), self._eta_text(c),
        )
        # A bar renders no line end of its own: give it a grid row, with the share finished.
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(1, c["total"]), completed=finished, width=60),
                    f"{100 * finished / max(1, c['total']):.0f}% finished")

        table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, expand=False, header_style="bold")
        table.add_column("node", no_wrap=True)
        table.add_column("stage", overflow="ellipsis", no_wrap=True, max_width=80)
        table.add_column("running for", justify="right", no_wrap=True)
        table.add_column("progress", overflow="ellipsis", no_wrap=True, max_width=50)
        for node_id, runs in rows_by_node.items():
            label = node_labels.get(node_id, node_id[:8])
            if not runs:
                table.add_row(label, Text("idle", style="dim"), "", "")
            for key, run in runs:
                table.add_row(label, self._name(key), format_duration(now - run.started), run.note)
        parts: list[RenderableType] = [line, bar]
        if rows_by_node:
            parts.append(table)
        return Group(*parts)

    def _eta_text(self, c: Mapping[str, int]) -> str:
        if c["pending"] == 0 and c["running"] == 0:
            return "-"
        with self._lock:
            timed = any(self.durations_s.values())
        if not timed:
            return "estimating (no stage finished yet)"
        est = self.estimate()
        if est.complete:
            return f"~{format_duration(est.remaining_s)}"
        untimed = f"no {', '.join(est.untimed_kinds)} stage finished yet"
        if est.remaining_s < 1:
            return f"estimating ({untimed})"
        return f">= {format_duration(est.remaining_s)} ({untimed})"


# -- choosing ------------------------------------------------------------------------------


def is_interactive(stream: Any) -> bool:
    """True when *stream* is a terminal a live display can redraw: a TTY, and not
    ``TERM=dumb``. Pipes, files and CI logs are not."""
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def make_progress(
    plan: Any,
    *,
    stream: IO[str] | None = None,
    live: bool | None = None,
    initial_status: Mapping[str, str] | None = None,
) -> LineProgress | LiveProgress:
    """The progress display for ``greensweep run`` (and ``resume``).

    *live* None (``--progress auto``): the live display when *stream* (default: standard
    output) is an interactive terminal, else plain lines. True (``--progress live``):
    the live display regardless (the terminal is forced). False (``--progress plain``):
    plain lines. *initial_status*: stages a resumed sweep need not run again (the live
    display counts them as done; plain lines print only what happens now).
    """
    target = stream if stream is not None else sys.stdout
    if live is False or (live is None and not is_interactive(target)):
        return LineProgress(plan, stream=stream)
    from rich.console import Console

    console = Console(file=target, force_terminal=True if live else None)
    return LiveProgress(plan, console=console, initial_status=initial_status)

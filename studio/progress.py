"""rich progress for batch jobs: one bar for the batch, one for the unit in hand."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from studio.jobs import Unit


class RichReporter:
    """Implements :class:`studio.jobs.Reporter` with two rich progress bars."""

    def __init__(self, console: Console, total_units: int):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.overall = self.progress.add_task("batch", total=total_units)
        self.current: Any = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def unit_started(self, unit: Unit, total: int) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(f"{unit.id} ({unit.kind})", total=total)

    def unit_advanced(self, unit: Unit, n: int) -> None:
        if self.current is not None:
            self.progress.advance(self.current, n)

    def unit_finished(self, unit: Unit, result: dict[str, Any]) -> None:
        self.progress.advance(self.overall, 1)
        status = result.get("status")
        if status == "done":
            mps = result.get("megapixels_per_second")
            rate = f", {mps} MPix/s" if mps else ""
            self.console.print(f"[green]done[/] {unit.id} -> {unit.output} ({result.get('seconds')} s{rate})")
        else:
            self.console.print(f"[red]failed[/] {unit.id}: {result.get('error')}")

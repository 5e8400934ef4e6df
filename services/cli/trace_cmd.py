"""``aidc trace`` and ``aidc traces``: a trace from the local span store as a tree; recent traces."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from services.mesh.spanstore import SpanStore, render_tree, traces_dir

__all__ = ["register", "show_trace", "list_traces"]

_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")

DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="AIDC_DATA_DIR",
        help="The platform's data directory; spans are read from its traces/ folder.",
        show_default=True,
    ),
]


def register(app: typer.Typer) -> None:
    """Adds the ``trace`` and ``traces`` commands to the CLI."""
    app.command("trace")(show_trace)
    app.command("traces")(list_traces)


def show_trace(
    trace_id: Annotated[str, typer.Argument(help="The 32-hex-digit trace id (e.g. from a log line).")],
    data_dir: DataDirOption = Path(".aidc"),
) -> None:
    """Print one trace as a tree of spans: name, service, duration and key attributes."""
    wanted = trace_id.strip().lower()
    if not _TRACE_ID.match(wanted):
        raise typer.BadParameter("a trace id is 32 hexadecimal digits", param_hint="TRACE_ID")
    store = SpanStore(traces_dir(data_dir))
    spans = store.spans(wanted)
    if not spans:
        typer.echo(f"trace {wanted} not found in {store.directory}", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"trace {wanted}  ({len(spans)} spans)")
    typer.echo(render_tree(spans))


def list_traces(
    data_dir: DataDirOption = Path(".aidc"),
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many traces to list.")] = 20,
) -> None:
    """List the most recent traces: id, start time, root span, duration, span count."""
    store = SpanStore(traces_dir(data_dir))
    summaries = store.recent_traces(limit)
    if not summaries:
        typer.echo(f"no traces in {store.directory}")
        return
    for summary in summaries:
        started = datetime.fromtimestamp(summary.start_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(
            f"{summary.trace_id}  {started}  {summary.root_name}  [{summary.root_service}]"
            f"  {summary.duration_ns / 1e6:.1f} ms  {summary.span_count} spans"
        )

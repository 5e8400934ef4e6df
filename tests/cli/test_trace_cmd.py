"""``aidc trace`` / ``aidc traces`` over a span store written by the real writer."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from services.cli.trace_cmd import register
from services.mesh.spanstore import SpanRecord, SpanStoreWriter

TRACE = "0af7651916cd43dd8448eb211c80319c"
T0 = 1_700_000_000_000_000_000


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _write_trace(data_dir: Path) -> None:
    def span(span_id: str, parent: str, name: str, service: str, start_ms: int, dur_ms: int) -> SpanRecord:
        return SpanRecord(
            trace_id=TRACE,
            span_id=span_id * 16,
            parent_span_id=parent * 16 if parent else "",
            name=name,
            service=service,
            kind="SERVER",
            start_ns=T0 + start_ms * 1_000_000,
            end_ns=T0 + (start_ms + dur_ms) * 1_000_000,
        )

    SpanStoreWriter(data_dir / "traces" / "serving-1.jsonl").append([span("a", "", "ModelInfer", "serving", 0, 9)])
    SpanStoreWriter(data_dir / "traces" / "collector-2.jsonl").append([span("b", "a", "InferRequest", "triton", 1, 6)])


def test_trace_prints_the_tree(tmp_path: Path) -> None:
    _write_trace(tmp_path)
    result = CliRunner().invoke(_app(), ["trace", TRACE, "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1:] == ["ModelInfer  [serving]  9.0 ms", "  InferRequest  [triton]  6.0 ms"]


def test_trace_reads_data_dir_from_env(tmp_path: Path) -> None:
    _write_trace(tmp_path)
    result = CliRunner().invoke(_app(), ["trace", TRACE.upper()], env={"AIDC_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0 and "InferRequest  [triton]" in result.stdout


def test_unknown_trace_exits_1_with_a_message(tmp_path: Path) -> None:
    _write_trace(tmp_path)
    result = CliRunner().invoke(_app(), ["trace", "f" * 32, "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert f"trace {'f' * 32} not found" in result.stderr


def test_malformed_trace_id_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["trace", "not-an-id", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "32 hexadecimal digits" in result.output


def test_traces_lists_recent_traces(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["traces", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and "no traces" in result.stdout
    _write_trace(tmp_path)
    result = CliRunner().invoke(_app(), ["traces", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0
    (line,) = result.stdout.splitlines()
    assert line.startswith(TRACE) and "ModelInfer  [serving]  9.0 ms  2 spans" in line

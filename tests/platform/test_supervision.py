"""The supervisor's mechanics with real stand-in processes (tests/platform/standin.py) instead of the
platform: start order, readiness, restart after a crash, whole-session stop, fail-fast startup, `down`.

The stand-ins are plain HTTP servers, so these run in seconds; tests/platform/test_supervisor.py runs the same
supervisor over the real platform.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.mesh.config import SERVICE_NAMES, MeshSettings
from services.mesh.metrics import scrape
from services.platform.components import (
    ComponentSpec,
    Platform,
    ProbeSpec,
    S3Credentials,
    build_components,
    resolve_platform,
)
from services.platform.config import PlatformSettings
from services.platform.process import process_id, session_members, terminate_session
from services.platform.state import ComponentState, PlatformState, read_state, state_path, write_state
from services.platform.supervisor import AlreadyRunning, StartupError, Supervisor, stop_platform

STANDIN = Path(__file__).with_name("standin.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_platform(tmp_path: Path) -> Platform:
    # No supervisor metrics endpoint: its default port may be taken by anything running beside the tests.
    settings = PlatformSettings(
        stop_grace_seconds=2.0, restart_backoff_seconds=0.1, startup_timeout_seconds=20.0, supervisor_metrics_port=0
    )
    return resolve_platform(MeshSettings(data_dir=tmp_path / "data"), settings, S3Credentials("a", "b"))


def standin(platform: Platform, name: str, *args: str, stage: int = 0) -> ComponentSpec:
    port = free_port()
    return ComponentSpec(
        name=name,
        argv=(sys.executable, str(STANDIN), str(port), *args),
        env=dict(os.environ),
        cwd=platform.data_dir,
        log_file=platform.logs_dir / f"{name}.log",
        probe=ProbeSpec("http", f"http://127.0.0.1:{port}/healthz"),
        address=f"127.0.0.1:{port}",
        endpoints=(f"http://127.0.0.1:{port}",),
        listens=(f"127.0.0.1:{port}",),
        start_stage=stage,
        stop_stage=1 - stage,
    )


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def component(supervisor: Supervisor, name: str) -> ComponentState:
    return next(c for c in supervisor.state.components if c.name == name)


async def run_until_serving(supervisor: Supervisor) -> asyncio.Task[None]:
    task = asyncio.create_task(supervisor.run())
    await eventually(lambda: supervisor.state.status == "serving" or task.done())
    if task.done():
        task.result()
    return task


async def test_restart_after_crash_and_clean_stop(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    specs = [standin(platform, "runtime", "--child"), standin(platform, "service", stage=1)]
    ready: list[PlatformState] = []
    supervisor = Supervisor(platform, specs, on_ready=ready.append)
    task = await run_until_serving(supervisor)
    assert len(ready) == 1
    assert read_state(platform.run_dir) is not None
    assert (platform.run_dir / "supervisor.pid").read_text().strip() == str(os.getpid())

    runtime = component(supervisor, "runtime")
    first_pid = runtime.pid
    assert first_pid is not None
    assert len(session_members(first_pid)) == 2  # the stand-in and its forked child
    os.kill(first_pid, signal.SIGKILL)
    await eventually(lambda: runtime.restarts == 1 and runtime.status == "running")
    assert runtime.pid not in (None, first_pid)
    assert runtime.last_exit == -signal.SIGKILL
    # The crashed process's child went with it before the restart.
    assert session_members(first_pid) == []

    sessions = [c.session for c in supervisor.state.components]
    supervisor.request_stop()
    await asyncio.wait_for(task, 20)
    for session in sessions:
        assert session is not None and session_members(session) == []
    assert not state_path(platform.run_dir).exists()
    assert not (platform.run_dir / "supervisor.pid").exists()


async def test_services_start_only_after_the_runtime_is_ready(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    supervisor = Supervisor(
        platform,
        [standin(platform, "runtime", "--never-ready"), standin(platform, "service", stage=1)],
        startup_timeout=1.5,
    )
    with pytest.raises(StartupError) as failure:
        await supervisor.run()
    message = str(failure.value)
    assert "timed out" in message and "runtime" in message and "HTTP 503" in message
    assert "standin listening" in message  # the tail of its log
    assert component(supervisor, "service").pid is None and component(supervisor, "service").session is None
    state = read_state(platform.run_dir)
    assert state is not None and state.status == "failed" and "runtime" in state.error


async def test_crash_loop_at_startup_fails_fast(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    supervisor = Supervisor(platform, [standin(platform, "good"), standin(platform, "bad", "--exit", "3")])
    began = time.monotonic()
    with pytest.raises(StartupError, match=r"bad exited 3 times before becoming ready \(last exit code 3\)"):
        await supervisor.run()
    assert time.monotonic() - began < 10
    good = component(supervisor, "good")
    assert good.session is not None and session_members(good.session) == []


async def test_sigkill_after_grace(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    supervisor = Supervisor(platform, [standin(platform, "stubborn", "--ignore-sigterm")])
    task = await run_until_serving(supervisor)
    session = component(supervisor, "stubborn").session
    began = time.monotonic()
    supervisor.request_stop()
    await asyncio.wait_for(task, 20)
    assert 2.0 <= time.monotonic() - began < 10
    assert session is not None and session_members(session) == []


async def test_busy_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    spec = standin(platform, "web")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(spec.address.rsplit(":", 1)[1])))
        squatter.listen()
        supervisor = Supervisor(platform, [spec])
        with pytest.raises(StartupError, match=f"address already in use: {spec.address} \\(web\\)"):
            await supervisor.run()
    assert component(supervisor, "web").session is None


async def test_one_supervisor_per_data_dir(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    first = Supervisor(platform, [standin(platform, "web")])
    task = await run_until_serving(first)
    try:
        with pytest.raises(AlreadyRunning):
            await Supervisor(platform, [standin(platform, "web2")]).run()
    finally:
        first.request_stop()
        await asyncio.wait_for(task, 20)


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    platform = make_platform(tmp_path)
    spec = standin(platform, "triton")
    broken = ComponentSpec(**{**spec.__dict__, "argv": (str(tmp_path / "nope" / "tritonserver"),)})
    with pytest.raises(StartupError, match="triton: cannot start .*tritonserver: No such file"):
        await Supervisor(platform, [broken]).run()


def spawn_session(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(STANDIN), str(free_port()), *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )


async def _wait_members(sid: int, count: int) -> None:
    await eventually(lambda: len(session_members(sid)) == count)


def test_terminate_session_kills_orphaned_members() -> None:
    leader = spawn_session("--child")
    asyncio.run(_wait_members(leader.pid, 2))
    leader.kill()
    leader.wait()
    (orphan,) = session_members(leader.pid)
    assert terminate_session(leader.pid, grace=2.0) == [orphan]
    assert session_members(leader.pid) == []
    assert process_id(orphan) is None


def test_down_kills_what_a_dead_supervisor_left(tmp_path: Path) -> None:
    """`aidc down` after the supervisor was SIGKILLed: its components live on in their sessions."""
    run_dir = tmp_path / "run"
    leftovers = [spawn_session("--child"), spawn_session("--ignore-sigterm")]
    asyncio.run(_wait_members(leftovers[0].pid, 2))
    asyncio.run(_wait_members(leftovers[1].pid, 1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = PlatformState(supervisor_pid=dead.pid, supervisor_start_ticks=1, data_dir=str(tmp_path), started_at=0)
    for i, process in enumerate(leftovers):
        ident = process_id(process.pid)
        assert ident is not None
        state.components.append(
            ComponentState(
                name=f"c{i}",
                address="",
                endpoints=[],
                probe=ProbeSpec("tcp", "127.0.0.1:1"),
                log_file="",
                pid=process.pid,
                start_ticks=ident.start_ticks,
                session=process.pid,
            )
        )
    write_state(run_dir, state)
    report = stop_platform(run_dir, grace=1.0)
    for process in leftovers:
        process.wait(5)
    assert report.supervisor_pid is None
    assert set(report.stragglers) == {"c0", "c1"} and len(report.stragglers["c0"]) == 2
    assert report.left == []
    assert not state_path(run_dir).exists()
    # Idempotent: nothing left to do the second time.
    assert stop_platform(run_dir, grace=1.0).stragglers == {}


def health_checked_platform(tmp_path: Path, failures: int, interval: float, supervisor_metrics_port: int) -> Platform:
    """make_platform's, with health checks ``interval`` seconds apart, each waiting 0.5 s."""
    settings = PlatformSettings(
        stop_grace_seconds=2.0,
        restart_backoff_seconds=0.1,
        startup_timeout_seconds=20.0,
        health_check_interval_seconds=interval,
        health_check_timeout_seconds=0.5,
        health_check_failures=failures,
        supervisor_metrics_port=supervisor_metrics_port,
    )
    return resolve_platform(MeshSettings(data_dir=tmp_path / "data"), settings, S3Credentials("a", "b"))


async def test_a_hung_component_is_killed_and_restarted(tmp_path: Path) -> None:
    """SIGSTOP: the process lives on but answers nothing. The supervisor's health checks notice, kill it and
    restart it with the crash backoff; the state and the supervisor's metrics say it hung."""
    platform = health_checked_platform(tmp_path, failures=3, interval=0.2, supervisor_metrics_port=free_port())
    supervisor = Supervisor(platform, [standin(platform, "web"), standin(platform, "steady")])
    task = await run_until_serving(supervisor)
    web = component(supervisor, "web")
    scraped = await asyncio.to_thread(scrape, supervisor.state.metrics_url)
    assert scraped.value("aidc_component_up", component="web") == 1
    assert scraped.value("aidc_component_restarts_total", component="web", reason="hung") == 0
    try:
        first = web.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        began = time.monotonic()
        await eventually(lambda: web.restarts == 1 and web.status == "running", timeout=20)
        # 3 unanswered checks 0.2 s apart, each waiting 0.5 s: well under 10 s even on a loaded machine.
        assert time.monotonic() - began < 10
        assert web.pid not in (None, first) and process_id(first) is None
        assert web.hung_restarts == 1 and web.last_restart.startswith("hung: 3 health checks unanswered")
        assert web.last_exit == -signal.SIGKILL
        steady = component(supervisor, "steady")
        assert steady.restarts == 0  # a healthy neighbour is left alone
        scraped = await asyncio.to_thread(scrape, supervisor.state.metrics_url)
        assert scraped.value("aidc_component_restarts_total", component="web", reason="hung") == 1
        assert scraped.value("aidc_component_restarts_total", component="web", reason="exit") == 0
        assert scraped.value("aidc_component_up", component="web") == 1
        stored = read_state(platform.run_dir)
        assert stored is not None and next(c for c in stored.components if c.name == "web").hung_restarts == 1
    finally:
        supervisor.request_stop()
        await asyncio.wait_for(task, 20)


async def test_not_serving_is_an_answer_not_a_hang(tmp_path: Path) -> None:
    """A component that answers "not ready" (HTTP 503 here, NOT_SERVING in gRPC) is waiting for something a
    restart would not bring: it is never killed for it."""
    platform = health_checked_platform(tmp_path, failures=2, interval=0.1, supervisor_metrics_port=0)
    supervisor = Supervisor(platform, [standin(platform, "flaky", "--ready-for", "1")])
    task = await run_until_serving(supervisor)
    try:
        flaky = component(supervisor, "flaky")
        await eventually(lambda: supervisor.metrics.up.labels("flaky")._value.get() == 0)
        await asyncio.sleep(1.0)  # ten more checks, each answered 503
        assert flaky.restarts == 0 and flaky.status == "running"
    finally:
        supervisor.request_stop()
        await asyncio.wait_for(task, 20)


async def test_monitoring_without_prometheus_installed_is_a_clear_error(tmp_path: Path) -> None:
    """`aidc up --monitoring` on a machine without Debian's prometheus: it says how to get it."""
    settings = PlatformSettings(
        stop_grace_seconds=2.0,
        startup_timeout_seconds=20.0,
        supervisor_metrics_port=0,
        monitoring=True,
        prometheus_bin=str(tmp_path / "nowhere" / "prometheus"),
        platform_components=("collector",),
        collector_addr=f"127.0.0.1:{free_port()}",
        prometheus_port=free_port(),
        **{f"{service}_metrics_port": 0 for service in SERVICE_NAMES},
    )
    platform = resolve_platform(
        MeshSettings(data_dir=tmp_path / "data", certs_dir="off"), settings, S3Credentials("a", "b")
    )
    specs = [spec for spec in build_components(platform) if spec.name == "prometheus"]
    assert len(specs) == 1 and specs[0].argv[0] == str(tmp_path / "nowhere" / "prometheus")
    with pytest.raises(StartupError, match="prometheus: cannot start .*: No such file.*make prometheus-server"):
        await Supervisor(platform, specs).run()
    # Its configuration was written: every service's metrics port and the rules file (plain HTTP: no certificates).
    config = json.loads((platform.prometheus_dir / "prometheus.yml").read_text())
    assert config["rule_files"] == [str(platform.project_root / "deploy" / "monitoring" / "aidc-alerts.yml")]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["prometheus"]
    assert "scheme" not in config["scrape_configs"][0]

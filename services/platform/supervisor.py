"""The platform supervisor: starts every component, waits for SERVING, restarts crashes, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.mesh.certs import init_certificates, issue_service_certificate
from services.mesh.config import MeshSettings, load_settings
from services.mesh.files import private_dir, use_private_umask
from services.mesh.metrics import MetricsEndpoint
from services.platform.components import (
    MONITORING_IDENTITIES,
    ComponentSpec,
    Platform,
    S3Credentials,
    ensure_s3_credentials,
    metrics_url,
    prepare_data_dir,
    resolve_platform,
    settings_env,
)
from services.platform.config import PlatformSettings
from services.platform.metrics import SupervisorMetrics
from services.platform.probes import Health, probe
from services.platform.process import (
    ProcessId,
    busy_addresses,
    is_running,
    process_id,
    session_members,
    signal_session,
    terminate_session,
)
from services.platform.ray_head import ray_share
from services.platform.state import (
    ComponentState,
    PlatformState,
    read_state,
    remove_run_files,
    write_pid_file,
    write_state,
)

__all__ = [
    "StartupError",
    "AlreadyRunning",
    "Supervisor",
    "load_platform",
    "running_state",
    "start_detached",
    "stop_platform",
    "StopReport",
    "log_tail",
]

logger = logging.getLogger(__name__)

#: A component exiting this many times before it was ever ready fails `aidc up` at once (bad config, ...).
_MAX_STARTUP_CRASHES = 3
#: A process that ran this long before crashing restarts with the initial backoff again.
_STABLE_SECONDS = 30.0
#: How long leftover members of a component's session (Triton's python stubs) get after their leader is gone.
_STRAGGLER_GRACE = 3.0
_POLL_SECONDS = 0.25


class StartupError(Exception):
    """The platform did not come up; the message names the component and shows the end of its log."""


class AlreadyRunning(Exception):
    """A supervisor already runs for this data directory."""

    def __init__(self, state: PlatformState) -> None:
        super().__init__(f"aidc is already running (supervisor pid {state.supervisor_pid}, data {state.data_dir})")
        self.state = state


def load_platform(env: Mapping[str, str] | None = None, *, create_credentials: bool = True) -> Platform:
    """Settings from the environment, with absolute paths and the S3 identity (generated once when needed)."""
    mesh = load_settings(MeshSettings, env)
    settings = load_settings(PlatformSettings, env)
    if create_credentials:
        use_private_umask()  # what `aidc up` creates (credentials, certificates, logs) is private from the start
        credentials = ensure_s3_credentials(settings, mesh.data_dir.resolve())
        if mesh.certs_dir != "off":
            # Mutual TLS between services is the default: a local CA and a certificate per service.
            certs = Path(mesh.certs_dir) if mesh.certs_dir else mesh.data_dir.resolve() / "certs"
            init_certificates(certs)
            for name in MONITORING_IDENTITIES:  # the supervisor's metrics endpoint, the local Prometheus
                if not (certs / f"{name}.pem").exists():
                    issue_service_certificate(certs, name)
    else:
        credentials = S3Credentials(settings.aws_access_key_id, settings.aws_secret_access_key)
    platform = resolve_platform(mesh, settings, credentials)
    if settings.ray:
        ray_share(platform, os.environ if env is None else env)  # a split that cannot work is refused here
    return platform


def log_tail(path: Path | str, lines: int = 20, since: int = 0) -> str:
    """The last lines of a log file, ignoring its first `since` bytes (empty when there is none)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(since, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _with_tail(message: str, log_file: Path | str, since: int = 0) -> str:
    tail = log_tail(log_file, since=since)
    indented = "\n".join(f"    {line}" for line in tail.splitlines()) if tail else "    (empty)"
    return f"{message}\n  last lines of {log_file}:\n{indented}"


def running_state(run_dir: Path) -> PlatformState | None:
    """The state of the supervisor running for this data directory, or None when none runs."""
    state = read_state(run_dir)
    if state is not None and is_running(state.supervisor):
        return state
    return None


@contextlib.contextmanager
def _exclusive_lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "supervisor.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            state = read_state(run_dir)
            if state is None:
                raise StartupError(f"another aidc supervisor holds {run_dir / 'supervisor.lock'}") from None
            raise AlreadyRunning(state) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class _Run:
    """A supervised component: its spec, its published state and the bookkeeping behind restarts."""

    spec: ComponentSpec
    state: ComponentState
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ever_ready: bool = False
    startup_crashes: int = 0
    consecutive_crashes: int = 0
    fatal: str = ""
    #: Health checks in a row that got no answer while it was running.
    unanswered: int = 0
    #: Why the supervisor itself killed the current process ("" if it did not): the restart's reason.
    killed_because: str = ""


class Supervisor:
    """Runs the components of one data directory in the foreground until asked to stop."""

    def __init__(
        self,
        platform: Platform,
        specs: list[ComponentSpec],
        *,
        startup_timeout: float | None = None,
        on_ready: Callable[[PlatformState], None] | None = None,
    ) -> None:
        self._platform = platform
        self._settings = platform.platform
        self._timeout = startup_timeout or self._settings.startup_timeout_seconds
        self._on_ready = on_ready
        self._runs = {spec.name: _Run(spec, ComponentState.from_spec(spec)) for spec in specs}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._stopping = False
        self._serving = False
        self.metrics = SupervisorMetrics(list(self._runs))
        self._endpoint: MetricsEndpoint | None = None
        self._health_task: asyncio.Task[None] | None = None
        me = process_id(os.getpid())
        self._state = PlatformState(
            supervisor_pid=os.getpid(),
            supervisor_start_ticks=me.start_ticks if me else 0,
            data_dir=str(platform.data_dir),
            started_at=time.time(),
            components=[run.state for run in self._runs.values()],
        )

    @property
    def state(self) -> PlatformState:
        return self._state

    def request_stop(self) -> None:
        """Asks the supervisor to stop every component and return (safe from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Starts everything, waits for SERVING, supervises until stopped; StartupError if it can't start."""
        use_private_umask()  # every file of the platform, and of the processes it starts, is private
        run_dir = self._platform.run_dir
        with _exclusive_lock(run_dir):
            previous = read_state(run_dir)
            write_state(run_dir, self._state)
            write_pid_file(run_dir, os.getpid())
            loop = asyncio.get_running_loop()
            handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            for sig in handled:
                loop.add_signal_handler(sig, self.request_stop)
            failure: StartupError | None = None
            try:
                if previous is not None:
                    await asyncio.to_thread(self._reap_leftovers, previous)
                prepare_data_dir(self._platform)
                self._check_ports()
                self._start_metrics()
                await self._start()
                self._health_task = asyncio.create_task(self._watch_health(), name="health-checks")
                await self._stop.wait()
            except StartupError as exc:
                failure = exc
            finally:
                # Signal handlers stay on while stopping: a second Ctrl-C must not abandon half-stopped children.
                await self._stop_all()
                if self._endpoint is not None:
                    self._endpoint.stop()
                for sig in handled:
                    loop.remove_signal_handler(sig)
                if failure is None:
                    remove_run_files(run_dir)
                else:
                    # Kept for whoever launched a detached supervisor: it reads the error from here.
                    self._state.status = "failed"
                    self._state.error = str(failure)
                    self._write()
                    (run_dir / "supervisor.pid").unlink(missing_ok=True)
            if failure is not None:
                raise failure

    # -- startup ------------------------------------------------------------------------------------------

    def _reap_leftovers(self, previous: PlatformState) -> None:
        """Kills components a previous supervisor left behind when it died without cleaning up."""
        for component in previous.components:
            if component.session is not None and session_members(component.session):
                logger.warning(
                    "stopping %s left over from a previous run (session %d)",
                    component.name,
                    component.session,
                )
                terminate_session(component.session, self._settings.stop_grace_seconds)

    def _metrics_address(self) -> str:
        port = self._settings.supervisor_metrics_port
        return f"{self._platform.mesh.host}:{port}" if port else ""

    def _start_metrics(self) -> None:
        address = self._metrics_address()
        if not address:
            return
        mesh = self._platform.mesh
        self._endpoint = MetricsEndpoint(
            address,
            mesh.tls_dir(),
            "supervisor",
            require_client_cert=mesh.client_auth == "require",
            registry=self.metrics.registry,
        )
        self._endpoint.start()
        self._state.metrics_url = metrics_url(self._platform, self._endpoint.port)

    def _check_ports(self) -> None:
        owners = {address: run.spec.name for run in self._runs.values() for address in run.spec.listens}
        if self._metrics_address():
            owners[self._metrics_address()] = "supervisor metrics"
        busy = busy_addresses(list(owners))
        if busy:
            taken = ", ".join(f"{address} ({owners[address]})" for address in busy)
            raise StartupError(
                f"address already in use: {taken}. Is another aidc or another program running? "
                "Stop it, or move the component with its AIDC_* address variable."
            )

    async def _start(self) -> None:
        began = time.monotonic()
        deadline = began + self._timeout
        for stage in sorted({run.spec.start_stage for run in self._runs.values()}):
            runs = [run for run in self._runs.values() if run.spec.start_stage == stage]
            for run in runs:
                self._tasks[run.spec.name] = asyncio.create_task(
                    self._supervise(run), name=f"supervise-{run.spec.name}"
                )
            await self._wait_ready(runs, deadline, began)
        self._serving = True
        self._state.status = "serving"
        self._state.ready_seconds = round(time.monotonic() - began, 2)
        self._write()
        logger.info("all %d components SERVING after %.1fs", len(self._runs), self._state.ready_seconds)
        if self._on_ready is not None:
            self._on_ready(self._state)

    async def _wait_ready(self, runs: list[_Run], deadline: float, began: float) -> None:
        pending = {run.spec.name: run for run in runs}
        details: dict[str, str] = {}
        while pending:
            if self._stop.is_set():
                raise StartupError("interrupted while starting")
            for run in pending.values():
                if run.fatal:
                    raise StartupError(run.fatal)
                if run.startup_crashes >= _MAX_STARTUP_CRASHES:
                    raise StartupError(
                        _with_tail(
                            f"{run.spec.name} exited {run.startup_crashes} times before becoming ready "
                            f"(last exit code {run.state.last_exit})",
                            run.spec.log_file,
                        )
                    )
            alive = [run for run in pending.values() if run.process is not None and run.process.returncode is None]
            results = await asyncio.gather(*(probe(run.spec.probe, self._platform.mesh, 1.0) for run in alive))
            for run, result in zip(alive, results, strict=True):
                if result.health is Health.SERVING:
                    run.ever_ready = True
                    run.state.status = "running"
                    self.metrics.up.labels(run.spec.name).set(1)
                    del pending[run.spec.name]
                    logger.info("%s SERVING after %.1fs", run.spec.name, time.monotonic() - began)
                    self._write()
                else:
                    details[run.spec.name] = f"{result.health.value} {result.detail}".strip()
            if pending and time.monotonic() >= deadline:
                raise StartupError(
                    f"timed out after {self._timeout:.0f}s waiting for "
                    + "\n".join(
                        _with_tail(
                            f"{name}: {run.spec.probe.describe()} -> {details.get(name, 'not started')}",
                            run.spec.log_file,
                        )
                        for name, run in pending.items()
                    )
                )
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), _POLL_SECONDS)

    # -- supervision --------------------------------------------------------------------------------------

    async def _spawn(self, run: _Run) -> asyncio.subprocess.Process:
        spec = run.spec
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_file, "ab") as log:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(spec.env),
                cwd=str(spec.cwd),
                # Its own session: Ctrl-C on the terminal reaches only the supervisor, which stops things in
                # order, and the whole session (Triton plus its python stubs) can be signalled at once.
                start_new_session=True,
            )
        ident = process_id(process.pid)
        run.process = process
        run.started = time.monotonic()
        run.state.pid = process.pid
        run.state.start_ticks = ident.start_ticks if ident else None
        run.state.session = process.pid
        run.state.status = "starting"
        self._write()
        logger.info("started %s (pid %d)", spec.name, process.pid)
        return process

    async def _supervise(self, run: _Run) -> None:
        spec = run.spec
        while not self._stopping:
            try:
                process = await self._spawn(run)
            except OSError as exc:
                hint = " (run `make install`)" if spec.argv[0].startswith(str(self._settings.runtime_dir)) else ""
                if spec.name == "prometheus":
                    hint = " (`make prometheus-server` installs Debian's prometheus package)"
                run.fatal = f"{spec.name}: cannot start {spec.argv[0]}: {exc.strerror or exc}{hint}"
                run.state.status = "failed"
                self._write()
                return
            if self._stopping:
                signal_session(process.pid, signal.SIGTERM)
            elif self._serving:
                self._watch(run, process)
            code = await process.wait()
            ran = time.monotonic() - run.started
            run.state.pid = None
            run.state.start_ticks = None
            run.state.last_exit = code
            self.metrics.up.labels(spec.name).set(0)
            if self._stopping:
                run.state.status = "stopped"
                self._write()
                return
            # What the crashed process left in its session (Triton's python stubs) goes before it restarts.
            await asyncio.to_thread(terminate_session, process.pid, _STRAGGLER_GRACE)
            run.state.restarts += 1
            why = run.killed_because or f"exit code {code}"
            if run.killed_because:
                run.state.hung_restarts += 1
            self.metrics.restarts.labels(spec.name, "hung" if run.killed_because else "exit").inc()
            run.state.last_restart = why
            run.killed_because, run.unanswered = "", 0
            if not run.ever_ready:
                run.startup_crashes += 1
            run.consecutive_crashes = 1 if ran >= _STABLE_SECONDS else run.consecutive_crashes + 1
            delay = min(
                self._settings.restart_backoff_max_seconds,
                self._settings.restart_backoff_seconds * 2 ** (run.consecutive_crashes - 1),
            )
            run.state.status = "restarting"
            self._write()
            logger.warning(
                "%s ended (%s) after %.1fs; restart #%d in %.1fs (log %s)",
                spec.name,
                why,
                ran,
                run.state.restarts,
                delay,
                spec.log_file,
            )
            if not run.ever_ready and run.startup_crashes >= _MAX_STARTUP_CRASHES:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _watch(self, run: _Run, process: asyncio.subprocess.Process) -> None:
        task = asyncio.create_task(self._until_ready(run, process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _until_ready(self, run: _Run, process: asyncio.subprocess.Process) -> None:
        """Marks a restarted component running again once its probe passes."""
        began = time.monotonic()
        while process.returncode is None and not self._stopping:
            result = await probe(run.spec.probe, self._platform.mesh, 1.0)
            if result.health is Health.SERVING and process.returncode is None:
                run.state.status = "running"
                self.metrics.up.labels(run.spec.name).set(1)
                self._write()
                logger.info(
                    "%s SERVING again %.1fs after restart #%d",
                    run.spec.name,
                    time.monotonic() - began,
                    run.state.restarts,
                )
                return
            await asyncio.sleep(0.5)

    # -- health ---------------------------------------------------------------------------------------------

    async def _watch_health(self) -> None:
        """Asks every running component for its health every interval. One that gives no answer (a hung or
        stopped process: SIGSTOP, a deadlock, an event loop blocked) that many times in a row is killed, and
        restarted like a crash. NOT_SERVING is an answer: a component waiting for a dependency is left alone."""
        settings = self._settings
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), settings.health_check_interval_seconds)
            if self._stopping:
                return
            runs = [
                run
                for run in self._runs.values()
                if run.state.status == "running" and run.process is not None and run.process.returncode is None
            ]
            results = await asyncio.gather(
                *(probe(run.spec.probe, self._platform.mesh, settings.health_check_timeout_seconds) for run in runs)
            )
            for run, result in zip(runs, results, strict=True):
                self._judge(run, result.health, result.detail)

    def _judge(self, run: _Run, health: Health, detail: str) -> None:
        process = run.process
        if self._stopping or process is None or process.returncode is not None or run.state.status != "running":
            return  # it ended or restarted while being asked
        self.metrics.up.labels(run.spec.name).set(1 if health is Health.SERVING else 0)
        if health is not Health.DOWN:
            run.unanswered = 0
            return
        run.unanswered += 1
        limit = self._settings.health_check_failures
        if run.unanswered < limit:
            logger.warning(
                "%s did not answer its health check (%s), %d of %d", run.spec.name, detail, run.unanswered, limit
            )
            return
        run.killed_because = f"hung: {limit} health checks unanswered ({detail})"
        run.state.status = "restarting"
        self._write()
        logger.error("%s is hung (%s); killing it to restart it", run.spec.name, run.killed_because)
        # SIGKILL: a stopped or hung process handles no SIGTERM. The restart goes through _supervise, as a crash.
        signal_session(process.pid, signal.SIGKILL)

    # -- shutdown -----------------------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        self._stopping = True
        self._stop.set()
        self._state.status = "stopping"
        self._write()
        for stage in sorted({run.spec.stop_stage for run in self._runs.values()}):
            runs = [run for run in self._runs.values() if run.spec.stop_stage == stage]
            await asyncio.gather(*(self._stop_component(run) for run in runs))
        for watcher in list(self._watchers):
            watcher.cancel()
        health = [self._health_task] if self._health_task is not None else []
        await asyncio.gather(*self._tasks.values(), *self._watchers, *health, return_exceptions=True)

    async def _stop_component(self, run: _Run) -> None:
        grace = self._settings.stop_grace_seconds
        process = run.process
        if process is not None and process.returncode is None:
            logger.info("stopping %s (pid %d)", run.spec.name, process.pid)
            signal_session(process.pid, signal.SIGTERM)
        task = self._tasks.get(run.spec.name)
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                logger.warning("%s did not stop within %.0fs; sending SIGKILL", run.spec.name, grace)
                if run.process is not None and run.process.returncode is None:
                    signal_session(run.process.pid, signal.SIGKILL)
                done, _ = await asyncio.wait({task}, timeout=5.0)
                if not done:
                    task.cancel()
        if run.state.session is not None:
            await asyncio.to_thread(terminate_session, run.state.session, _STRAGGLER_GRACE)
        run.state.status = "stopped"
        self._write()

    def _write(self) -> None:
        write_state(self._platform.run_dir, self._state)


# -- detached mode, down, status -----------------------------------------------------------------------------


def start_detached(
    platform: Platform, timeout: float | None = None, env: Mapping[str, str] | None = None
) -> PlatformState:
    """Starts a background supervisor (`python -m services.platform`); returns once all is SERVING."""
    run_dir = platform.run_dir
    running = running_state(run_dir)
    if running is not None:
        raise AlreadyRunning(running)
    timeout = timeout or platform.platform.startup_timeout_seconds
    use_private_umask()
    private_dir(platform.logs_dir)
    log_file = platform.logs_dir / "supervisor.log"
    # Resolved settings (absolute paths, the S3 identity) go along: the supervisor runs from the project root.
    child_env = {
        **(os.environ if env is None else env),
        **settings_env(platform.mesh),
        **settings_env(platform.platform),
    }
    with open(log_file, "ab") as log:
        since = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "services.platform", "--timeout", str(timeout)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=platform.project_root,
            start_new_session=True,
        )
    # Room for the supervisor to stop everything in order after a failed start.
    deadline = time.monotonic() + timeout + 3 * platform.platform.stop_grace_seconds + 30
    try:
        while True:
            code = process.poll()
            state = read_state(run_dir)
            mine = state is not None and state.supervisor_pid == process.pid
            if mine and state is not None and state.status == "serving":
                return state
            if code is not None:
                if mine and state is not None and state.error:
                    raise StartupError(state.error)
                raise StartupError(
                    _with_tail(
                        f"the supervisor exited with code {code} before the platform was ready",
                        log_file,
                        since,
                    )
                )
            if time.monotonic() > deadline:
                raise StartupError(_with_tail("the supervisor did not report SERVING in time", log_file, since))
            time.sleep(0.2)
    except BaseException:
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(3 * platform.platform.stop_grace_seconds + 15)
        raise


@dataclass(frozen=True)
class StopReport:
    """What `aidc down` found and did."""

    supervisor_pid: int | None
    #: Components whose processes were still alive after the supervisor was gone, with the pids killed.
    stragglers: dict[str, list[int]] = field(default_factory=dict)
    #: Pids still alive at the end (should be empty).
    left: list[int] = field(default_factory=list)


def _wait_exit(ident: ProcessId, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(ident):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_platform(run_dir: Path, grace: float) -> StopReport:
    """Stops the supervisor (which stops its components), then kills anything of the platform still alive."""
    state = read_state(run_dir)
    if state is None:
        (run_dir / "supervisor.pid").unlink(missing_ok=True)
        return StopReport(supervisor_pid=None)
    supervisor = state.supervisor
    stopped_supervisor: int | None = None
    if is_running(supervisor):
        stopped_supervisor = supervisor.pid
        logger.info("stopping supervisor pid %d", supervisor.pid)
        os.kill(supervisor.pid, signal.SIGTERM)
        # It stops services, then Triton and the object store, then the collector: three rounds of grace.
        if not _wait_exit(supervisor, 3 * grace + 15):
            logger.warning("supervisor pid %d did not exit; sending SIGKILL", supervisor.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor.pid, signal.SIGKILL)
            _wait_exit(supervisor, 5.0)
    stragglers: dict[str, list[int]] = {}
    for component in state.components:
        if component.session is None:
            continue
        killed = terminate_session(component.session, grace)
        if killed:
            logger.warning("killed %s processes left behind: %s", component.name, killed)
            stragglers[component.name] = killed
    left = [pid for c in state.components if c.session is not None for pid in session_members(c.session)]
    if is_running(supervisor):
        left.append(supervisor.pid)
    if not left:
        remove_run_files(run_dir)
    return StopReport(supervisor_pid=stopped_supervisor, stragglers=stragglers, left=left)

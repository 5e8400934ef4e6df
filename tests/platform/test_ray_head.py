"""`aidc up --ray`: a real Ray head as a supervised component (ray start --head --block on loopback, its ports in one
block, Ray's token authentication), which the scheduler is pointed at; stopped with the platform, leaving no Ray
process. Without the setting nothing of Ray is
started or configured."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.platform.components import Platform, build_components
from services.platform.process import session_members
from services.platform.ray_head import ray_auth_environment, ray_ports, ray_temp_dir
from services.platform.supervisor import Supervisor, load_platform
from services.scheduler.machine import machine_cores, machine_memory_bytes
from tests.conftest import ROOT
from tests.platform.test_components import flag, make_platform
from tests.platform.test_supervision import eventually, free_port, run_until_serving

pytestmark = pytest.mark.timeout(300)


def _platform(tmp_path: Path, **env: str) -> Platform:
    # No supervisor metrics endpoint: its default port may be taken by anything running beside the tests.
    return make_platform(
        tmp_path,
        AIDC_SUPERVISOR_METRICS_PORT="0",
        AIDC_STARTUP_TIMEOUT_SECONDS="120",
        AIDC_STOP_GRACE_SECONDS="10",
        **env,
    )


def test_without_the_setting_nothing_of_ray(tmp_path: Path) -> None:
    specs = {s.name: s for s in build_components(_platform(tmp_path), {"PATH": "/usr/bin"})}
    assert "ray" not in specs
    assert "AIDC_SCHEDULER_RAY_ADDRESS" not in specs["scheduler"].env


def test_the_ray_head_and_the_default_pool_split_this_machine(tmp_path: Path) -> None:
    """Both pools run on this machine: the head offers half its cores (AIDC_RAY_CPUS=0) and memory in proportion,
    no GPU, and the scheduler's default pool node the rest; no core, byte or GPU is offered twice. An operator's own
    figure for the default pool stands; a head that would leave it no core is refused before anything starts."""
    cores, memory = machine_cores(), machine_memory_bytes()
    specs = {s.name: s for s in build_components(_platform(tmp_path, AIDC_RAY="true"), {"PATH": "/usr/bin"})}
    head, scheduler = specs["ray"].argv, specs["scheduler"].env
    ray_cpus, ray_memory = int(flag(head, "--num-cpus")), int(flag(head, "--memory"))
    assert ray_cpus == max(1, cores // 2) and flag(head, "--num-gpus") == "0"
    assert ray_cpus * 1000 + int(scheduler["AIDC_SCHEDULER_LOCAL_CPU_MILLICORES"]) == cores * 1000
    assert ray_memory + int(scheduler["AIDC_SCHEDULER_LOCAL_MEMORY_BYTES"]) == memory
    assert abs(ray_memory / memory - ray_cpus / cores) < 1e-6
    assert not any(k.startswith("AIDC_SCHEDULER_LOCAL_") for k in specs["storage"].env)

    own = {"PATH": "/usr/bin", "AIDC_SCHEDULER_LOCAL_CPU_MILLICORES": "500"}
    specs = {s.name: s for s in build_components(_platform(tmp_path, AIDC_RAY="true"), own)}
    assert specs["scheduler"].env["AIDC_SCHEDULER_LOCAL_CPU_MILLICORES"] == "500"

    # Without a default pool node on this machine, the head offers all of it.
    no_node = {"PATH": "/usr/bin", "AIDC_SCHEDULER_REGISTER_LOCAL_NODE": "false"}
    specs = {s.name: s for s in build_components(_platform(tmp_path, AIDC_RAY="true"), no_node)}
    head = specs["ray"].argv
    assert (int(flag(head, "--num-cpus")), int(flag(head, "--memory"))) == (cores, memory)
    assert not any(k.startswith("AIDC_SCHEDULER_LOCAL_") for k in specs["scheduler"].env)

    every_core = {"AIDC_DATA_DIR": str(tmp_path / "data"), "AIDC_RAY": "true", "AIDC_RAY_CPUS": str(cores)}
    with pytest.raises(ValueError, match="leaves none of this machine's"):
        load_platform(every_core, create_credentials=False)
    load_platform({**every_core, **no_node}, create_credentials=False)


_NODES = """
import asyncio, json
from services.scheduler.executors.ray_cluster import RayCluster
cluster = RayCluster({address!r})
try:
    nodes = asyncio.run(cluster.nodes())
finally:
    cluster.close()
print(json.dumps([[n.alive, n.cpu_millicores, n.memory_bytes, n.name] for n in nodes]))
"""


#: A driver as the scheduler starts one: the environment every job inherits (no Ray token in it) plus what the Ray
#: executor adds for a driver; the driver runs a task on the cluster.
_DRIVER = """
import os, subprocess, sys
from services.scheduler.domain.jobs import _process_environment
from services.scheduler.executors.ray_cluster import driver_environment
base = _process_environment()
assert not any(k.startswith("RAY_AUTH") for k in base)
code = "import ray; ray.init(); print('task says', ray.get(ray.remote(lambda: 42).remote()))"
sys.exit(subprocess.run([sys.executable, "-c", code], env={{**base, **driver_environment({address!r})}}).returncode)
"""


def _nodes_as(env: dict[str, str], address: str) -> subprocess.CompletedProcess[str]:
    """The scheduler's view of the cluster from a process of its own with ``env`` (Ray's auth state is global to a
    process: the module's other tests' clusters have none)."""
    return _run(_NODES.format(address=address), env)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _listeners(pids: list[int]) -> set[tuple[str, int]]:
    out = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        out |= {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in connections if c.status == "LISTEN"}
    return out


async def test_aidc_up_ray_runs_a_supervised_ray_head_the_scheduler_joins(tmp_path: Path) -> None:
    """The head: supervised, up before the scheduler, on loopback, every listener in its port block, requiring
    Ray's token (which only the scheduler is given, from a 0600 file), earlier sessions pruned; stopped with the
    platform, leaving no Ray process."""
    port = free_port()
    while not all(_port_free(port + offset) for offset in range(40)):
        port = free_port()
    platform = _platform(tmp_path, AIDC_RAY="true", AIDC_RAY_PORT=str(port), AIDC_RAY_CPUS="1")
    specs = {s.name: s for s in build_components(platform)}
    address = f"127.0.0.1:{port}"
    assert specs["scheduler"].env["AIDC_SCHEDULER_RAY_ADDRESS"] == address
    head = specs["ray"]
    assert head.start_stage < specs["scheduler"].start_stage  # up before the scheduler that joins it
    auth = ray_auth_environment(platform)
    assert {k: specs["scheduler"].env[k] for k in auth} == auth == {k: head.env[k] for k in auth}
    assert not any(k.startswith("RAY_AUTH") for k in specs["storage"].env)
    # Sessions of earlier runs: all but the latest few are removed at start.
    temp = ray_temp_dir(platform)
    old = [temp / f"session_2026-01-0{day}_00-00-00_000000_1" for day in range(1, 7)]
    for directory in old:
        (directory / "logs").mkdir(parents=True)
    supervisor = Supervisor(platform, [head])
    task = await run_until_serving(supervisor)
    session = next(c.session for c in supervisor.state.components if c.name == "ray")
    try:
        token = Path(auth["RAY_AUTH_TOKEN_PATH"])
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
        # Ray opens its temp directory to everyone; the one above it is private (its sockets unreachable to others).
        assert stat.S_IMODE(temp.parent.stat().st_mode) == 0o700
        assert [d.exists() for d in old] == [False, False, False, True, True, True]

        joined = await asyncio.to_thread(_nodes_as, specs["scheduler"].env, address)
        assert joined.returncode == 0, joined.stderr[-2000:]
        [[alive, cpu, memory, name]] = json.loads(joined.stdout.splitlines()[-1])
        assert (alive, cpu) == (True, 1000) and name.startswith("ray-")
        assert memory == int(flag(head.argv, "--memory"))  # the pool's node offers the head's share, no more
        driver = await asyncio.to_thread(_run, _DRIVER.format(address=address), specs["scheduler"].env)
        assert driver.returncode == 0 and "task says 42" in driver.stdout, driver.stderr[-2000:]
        stranger = {k: v for k, v in specs["scheduler"].env.items() if not k.startswith("RAY_AUTH")}
        refused = await asyncio.to_thread(_nodes_as, stranger, address)
        assert refused.returncode != 0 and "auth" in refused.stderr.lower(), refused.stderr[-2000:]

        assert session is not None
        first, last = ray_ports(platform)
        listeners = _listeners(session_members(session))
        assert (("127.0.0.1", port)) in listeners
        assert {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners
        assert all(first <= p <= last for _, p in listeners), sorted(listeners)
    finally:
        supervisor.request_stop()
        await asyncio.wait_for(task, 60)
    await eventually(lambda: session_members(session) == [], 30)  # every Ray process of the head is gone
    shutil.rmtree(temp.parent, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

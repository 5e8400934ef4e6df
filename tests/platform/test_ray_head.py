"""`aidc up --ray`: a real Ray head as a supervised component (ray start --head --block on loopback), which the
scheduler is pointed at; stopped with the platform, leaving no Ray process. Without the setting nothing of Ray is
started or configured."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from services.platform.components import Platform, build_components, ray_temp_dir
from services.platform.process import session_members
from services.platform.supervisor import Supervisor
from services.scheduler.executors.ray_cluster import RayCluster
from tests.platform.test_components import make_platform
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


async def test_aidc_up_ray_runs_a_supervised_ray_head_the_scheduler_joins(tmp_path: Path) -> None:
    port = free_port()
    platform = _platform(tmp_path, AIDC_RAY="true", AIDC_RAY_PORT=str(port), AIDC_RAY_CPUS="1")
    specs = {s.name: s for s in build_components(platform)}
    assert specs["scheduler"].env["AIDC_SCHEDULER_RAY_ADDRESS"] == f"127.0.0.1:{port}"
    head = specs["ray"]
    assert head.start_stage < specs["scheduler"].start_stage  # up before the scheduler that joins it
    supervisor = Supervisor(platform, [head])
    task = await run_until_serving(supervisor)
    session = next(c.session for c in supervisor.state.components if c.name == "ray")
    try:
        cluster = RayCluster(f"127.0.0.1:{port}")
        try:
            nodes = await cluster.nodes()
        finally:
            await asyncio.to_thread(cluster.close)
        assert [(n.alive, n.cpu_millicores) for n in nodes] == [(True, 1000)]
        assert nodes[0].name.startswith("ray-")
    finally:
        supervisor.request_stop()
        await asyncio.wait_for(task, 60)
    assert session is not None
    await eventually(lambda: session_members(session) == [], 30)  # every Ray process of the head is gone
    shutil.rmtree(ray_temp_dir(platform), ignore_errors=True)

"""The local Ray head of `aidc up --ray`: its command line, its ports, its token and session files, and its share
of this machine. The head is the scheduler's Ray pool and this machine is also the default pool's node, so the two
split the machine: no core and no byte of memory is offered by both pools."""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.mesh.config import parse_flag
from services.mesh.files import private_dir, write_private
from services.platform.paths import short_path
from services.scheduler.machine import machine_cores, machine_memory_bytes

if TYPE_CHECKING:
    from services.platform.components import Platform

__all__ = [
    "RAY_MONITOR_PORT",
    "RAY_PORT_OFFSETS",
    "RayShare",
    "prepare_ray",
    "ray_address",
    "ray_auth_environment",
    "ray_head_argv",
    "ray_ports",
    "ray_share",
    "ray_temp_dir",
]

#: The scheduler's setting that makes this machine its default pool's node.
_LOCAL_NODE = "AIDC_SCHEDULER_REGISTER_LOCAL_NODE"

#: The local Ray head's listeners beside its GCS (AIDC_RAY_PORT), at fixed offsets from it, so that they are known
#: before it starts (checked free like every component's) and never land on another component's port, as Ray's
#: random picks may. Its worker processes take ports from _RAY_WORKER_PORTS (offsets, inclusive).
RAY_PORT_OFFSETS = {
    "--node-manager-port": 1,
    "--object-manager-port": 2,
    "--runtime-env-agent-port": 3,
    "--dashboard-agent-grpc-port": 4,
    "--dashboard-agent-listen-port": 5,
    "--metrics-export-port": 6,
    "--ray-client-server-port": 7,
}
#: Ray's autoscaler monitor serves its metrics on a fixed port (44217) unless told otherwise, by this variable.
RAY_MONITOR_PORT = ("AUTOSCALER_METRIC_PORT", 8)
_RAY_WORKER_PORTS = (10, 39)
#: Session directories of earlier runs kept in the Ray temp directory (each holds that run's Ray logs).
_RAY_SESSIONS_KEPT = 3


def ray_ports(platform: Platform) -> tuple[int, int]:
    """The first and last port of the local Ray head's block (its GCS, its other listeners and its workers')."""
    first = platform.platform.ray_port
    return first, first + _RAY_WORKER_PORTS[1]


def ray_head_argv(platform: Platform, share: RayShare) -> tuple[str, ...]:
    """A Ray head in the foreground (`ray start --block`: it exits, and the supervisor restarts it, if any of its
    processes dies), on the platform's host, every port in its block, without a dashboard, offering its share of
    this machine."""
    p = platform.platform
    binary = Path(sys.executable).with_name("ray")
    return (
        str(binary),
        "start",
        "--head",
        "--block",
        f"--port={p.ray_port}",
        *(f"{flag}={p.ray_port + offset}" for flag, offset in RAY_PORT_OFFSETS.items()),
        f"--min-worker-port={p.ray_port + _RAY_WORKER_PORTS[0]}",
        f"--max-worker-port={p.ray_port + _RAY_WORKER_PORTS[1]}",
        f"--node-ip-address={platform.mesh.host}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={ray_temp_dir(platform)}",
        f"--num-cpus={share.cpus}",
        f"--memory={share.memory_bytes}",
        "--num-gpus=0",
    )


def ray_auth_environment(platform: Platform) -> dict[str, str]:
    """Ray's token authentication for the local head: every Ray process, and every client that joins it (the
    scheduler, its drivers), presents the token in this private file; a local user without it cannot use the
    cluster (which would run code as the platform)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(platform.data_dir / "ray" / "auth_token")}


def prepare_ray(platform: Platform) -> None:
    """The head's token (made once, 0600) and its private temp directory, pruned of all but the latest sessions."""
    token = Path(ray_auth_environment(platform)["RAY_AUTH_TOKEN_PATH"])
    private_dir(token.parent)
    if not token.exists():
        write_private(token, secrets.token_hex(32).encode())
    private_dir(ray_temp_dir(platform).parent)
    temp = ray_temp_dir(platform)
    temp.mkdir(exist_ok=True)
    sessions = sorted((d for d in temp.glob("session_2*") if d.is_dir() and not d.is_symlink()), key=lambda d: d.name)
    for old in sessions[:-_RAY_SESSIONS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def ray_temp_dir(platform: Platform) -> Path:
    """Ray's session files: a short path of this data directory's own (Ray puts its unix sockets some 60 characters
    deeper, and a socket path holds at most 107 bytes), in a private directory (Ray opens its own to everyone)."""
    return short_path(platform.data_dir.resolve(), "ray") / "r"


def ray_address(platform: Platform) -> str:
    """The local Ray head's GCS address (what `ray.init` and `ray start --address` join)."""
    return f"{platform.mesh.host}:{platform.platform.ray_port}"


@dataclass(frozen=True)
class RayShare:
    """This machine split between the local Ray head and the default pool's node."""

    #: What the Ray head offers (its pool's node): cores, and memory in the same proportion. Its object store (Ray's
    #: default size: shared memory holding objects, a distributed fine-tune's dataset parts) is outside both pools.
    cpus: int
    memory_bytes: int
    #: What the default pool's node offers: the rest (AIDC_SCHEDULER_LOCAL_CPU_MILLICORES and _MEMORY_BYTES).
    default_pool_cpu_millicores: int
    default_pool_memory_bytes: int

    def default_pool_env(self) -> dict[str, str]:
        """The scheduler's settings for its default pool's node (none when this machine is not one)."""
        if not self.default_pool_cpu_millicores:
            return {}
        return {
            "AIDC_SCHEDULER_LOCAL_CPU_MILLICORES": str(self.default_pool_cpu_millicores),
            "AIDC_SCHEDULER_LOCAL_MEMORY_BYTES": str(self.default_pool_memory_bytes),
        }


def ray_share(platform: Platform, env: Mapping[str, str]) -> RayShare:
    """The head's share of this machine and the default pool's, which is the rest. The head offers AIDC_RAY_CPUS
    cores, or (0) half of them, at least one, and leaves the default pool at least one (ValueError otherwise); with
    no default pool node on this machine (the scheduler's AIDC_SCHEDULER_REGISTER_LOCAL_NODE=false in ``env``) it
    may offer all of them, and does by default."""
    cores, memory = machine_cores(), machine_memory_bytes()
    configured = platform.platform.ray_cpus
    if not parse_flag(env.get(_LOCAL_NODE, "true"), _LOCAL_NODE):
        cpus = configured or cores
        return RayShare(cpus, memory * min(cpus, cores) // cores, 0, 0)
    cpus = configured or max(1, cores // 2)
    if cpus >= cores:
        raise ValueError(
            f"AIDC_RAY_CPUS={cpus} leaves none of this machine's {cores} cores to the default pool: the local Ray head "
            f"and the default pool's node split the machine (give Ray fewer cores, or all of them with {_LOCAL_NODE}"
            "=false)"
        )
    share = memory * cpus // cores
    return RayShare(cpus, share, (cores - cpus) * 1000, memory - share)

"""``aidc deploy|undeploy|deployments|infer``: serving registry versions through Triton, and asking them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from services.cli.session import open_session
from services.gen.aidc.serving.v1 import serving_service_pb2 as pb
from services.serving.client import ServingClient, TextClassifierClient

__all__ = ["register", "parse_model_ref"]

_T = TypeVar("_T")
_out = Console(highlight=False, soft_wrap=False)
_err = Console(stderr=True, highlight=False)

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant; default: your own.", show_default=False)]
_REF = re.compile(r"^(?P<model>[^:@]+)(?::(?P<version>\d+)|@(?P<alias>[a-z0-9-]+))?$")


def register(app: typer.Typer) -> None:
    """Adds the serving commands to the CLI."""
    app.command("deploy")(deploy)
    app.command("undeploy")(undeploy)
    app.command("deployments")(deployments)
    app.command("infer")(infer)


def parse_model_ref(ref: str) -> tuple[str, int, str]:
    """``model``, ``model:3`` or ``model@production`` -> (model, version, alias)."""
    match = _REF.match(ref)
    if match is None:
        raise typer.BadParameter(f"{ref!r}: expected MODEL, MODEL:VERSION or MODEL@ALIAS")
    return match["model"], int(match["version"] or 0), match["alias"] or ""


def _serving(work: Callable[[ServingClient], Awaitable[_T]]) -> _T:
    async def main() -> _T:
        async with open_session() as session:
            return await work(ServingClient(session.channel("serving")))

    return asyncio.run(main())


def _state(value: int) -> str:
    return pb.DeploymentState.Name(value).removeprefix("DEPLOYMENT_STATE_").lower()  # type: ignore[arg-type]


def _print(deployment: pb.Deployment) -> None:
    version = f"v{deployment.version}" if deployment.version else "-"
    target = f" -> v{deployment.target_version}" if deployment.target_version else ""
    follows = f" (follows @{deployment.alias})" if deployment.alias else ""
    _out.print(f"{deployment.model}: {_state(deployment.state)} {version}{target}{follows}")
    if deployment.last_error:
        _err.print(f"last error: {deployment.last_error}")


def deploy(
    model: Annotated[str, typer.Argument(help="MODEL (latest version), MODEL:VERSION or MODEL@ALIAS.")],
    instances: Annotated[int, typer.Option("--instances", min=1, help="Model instances Triton runs.")] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", min=0, help="Largest dynamic batch; 0: no batching.")] = 8,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it serves (or the rollout fails).")] = True,
    tenant: TenantOption = "",
) -> None:
    """Deploy a registry version to Triton, or switch a deployment to another version (no failed requests)."""
    name, version, alias = parse_model_ref(model)
    deployment = _serving(
        lambda client: client.deploy(
            name,
            tenant=tenant,
            version=version,
            alias=alias,
            instance_count=instances,
            max_batch_size=max_batch,
            wait=wait,
        )
    )
    _print(deployment)


def undeploy(model: Annotated[str, typer.Argument(help="The deployed model.")], tenant: TenantOption = "") -> None:
    """Stop serving a model: unloaded from Triton and removed from the live repository."""
    deployment = _serving(lambda client: client.undeploy(model, tenant=tenant))
    _out.print(f"undeployed {deployment.model} (was v{deployment.version})")


def deployments(tenant: TenantOption = "") -> None:
    """The tenant's deployments."""
    found, _ = _serving(lambda client: client.list_deployments(tenant=tenant))
    table = Table("model", "state", "version", "alias", "instances", "max batch", "last error")
    for d in found:
        target = f" -> v{d.target_version}" if d.target_version else ""
        version = (f"v{d.version}" if d.version else "-") + target
        table.add_row(
            d.model, _state(d.state), version, d.alias, str(d.instance_count), str(d.max_batch_size), d.last_error
        )
    _out.print(table)


def infer(
    model: Annotated[str, typer.Argument(help="A deployed text classifier (yours, or TENANT/MODEL).")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
) -> None:
    """Classify texts with a deployed model (raw text in: tokenization runs inside Triton)."""

    async def main() -> list[tuple[str, str, float]]:
        async with open_session() as session:
            client = TextClassifierClient(session.channel("serving"))
            results = await client.classify(model, texts)
        return [(r.text, r.label, r.probabilities.get(r.label, 0.0)) for r in results]

    table = Table("text", "label", "probability")
    for text, label, probability in asyncio.run(main()):
        table.add_row(text, label, f"{probability:.3f}")
    _out.print(table)

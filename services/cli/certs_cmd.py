"""`aidc certs init|issue|service`: the mesh's local CA, its services' certificates and client certificates."""

from __future__ import annotations

from pathlib import Path

import typer

from services.mesh.certs import init_certificates, issue_client_certificate, issue_service_certificate
from services.mesh.config import SERVICE_NAMES, MeshSettings, load_settings
from services.mesh.errors import InvalidArgument

__all__ = ["register"]


def _default_dir() -> Path:
    settings = load_settings(MeshSettings)
    return Path(settings.certs_dir) if settings.certs_dir not in ("", "off") else settings.data_dir / "certs"


def register(app: typer.Typer) -> None:
    certs = typer.Typer(help="Local CA, service certificates and client certificates for mutual TLS.")
    app.add_typer(certs, name="certs")

    @certs.command("init")
    def init(
        directory: Path = typer.Option(
            None, "--dir", help="Where to write (default: AIDC_CERTS_DIR or <data_dir>/certs)."
        ),
        days: int = typer.Option(365, help="Validity in days."),
        force: bool = typer.Option(False, help="Start over with a new CA (every old certificate stops working)."),
    ) -> None:
        """Create the CA, one service certificate per mesh service and the CLI's client certificate (keeps existing
        ones; replaces them all, with a new CA, if they predate separate service and client identities)."""
        target = directory or _default_dir()
        issued = init_certificates(target, days=days, force=force)
        print(f"certificates in {target}: issued {', '.join(issued) if issued else 'nothing new'}")
        print(f"use them with AIDC_CERTS_DIR={target.resolve()}")

    @certs.command("issue")
    def issue(
        name: str = typer.Argument(..., help="Name of the client (not a mesh service's); the files are <name>.pem."),
        directory: Path = typer.Option(None, "--dir", help="Certificates directory (with ca.pem and ca-key.pem)."),
        days: int = typer.Option(365, help="Validity in days."),
    ) -> None:
        """Issue a client certificate (client authentication only; it can never serve nor be a mesh service)."""
        target = directory or _default_dir()
        issue_client_certificate(target, name, days)
        print(f"issued the client certificate {target / (name + '.pem')}")

    @certs.command("service")
    def service(
        name: str = typer.Argument(..., help=f"The mesh service: {', '.join(SERVICE_NAMES)}."),
        directory: Path = typer.Option(None, "--dir", help="Certificates directory (with ca.pem and ca-key.pem)."),
        host: list[str] = typer.Option([], help="Extra DNS names or IP addresses the service is reached at."),
        days: int = typer.Option(365, help="Validity in days."),
    ) -> None:
        """(Re)issue a mesh service's certificate, e.g. with its cluster DNS names."""
        if name not in SERVICE_NAMES:
            raise InvalidArgument(f"{name!r} is not a mesh service ({', '.join(SERVICE_NAMES)})")
        target = directory or _default_dir()
        issue_service_certificate(target, name, days, host)
        print(f"issued the service certificate {target / (name + '.pem')}")

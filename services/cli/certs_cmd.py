"""`aidc certs init|issue`: the mesh's local CA and per-service certificates for mutual TLS."""

from __future__ import annotations

from pathlib import Path

import typer

from services.mesh.certs import CERT_IDENTITIES, init_certificates, issue_certificate
from services.mesh.config import MeshSettings, load_settings

__all__ = ["register"]


def _default_dir() -> Path:
    settings = load_settings(MeshSettings)
    return Path(settings.certs_dir) if settings.certs_dir not in ("", "off") else settings.data_dir / "certs"


def register(app: typer.Typer) -> None:
    certs = typer.Typer(help="Local CA and per-service certificates for mutual TLS between services.")
    app.add_typer(certs, name="certs")

    @certs.command("init")
    def init(
        directory: Path = typer.Option(
            None, "--dir", help="Where to write (default: AIDC_CERTS_DIR or <data_dir>/certs)."
        ),
        days: int = typer.Option(365, help="Validity in days."),
        force: bool = typer.Option(False, help="Start over with a new CA (every old certificate stops working)."),
    ) -> None:
        """Create the CA and one certificate per service and for the CLI (keeps existing ones)."""
        target = directory or _default_dir()
        issued = init_certificates(target, CERT_IDENTITIES, days, force)
        print(f"certificates in {target}: issued {', '.join(issued) if issued else 'nothing new'}")
        print(f"use them with AIDC_CERTS_DIR={target.resolve()}")

    @certs.command("issue")
    def issue(
        identity: str = typer.Argument(..., help="Name of the identity; its certificate's CN is aidc-<name>."),
        directory: Path = typer.Option(None, "--dir", help="Certificates directory (with ca.pem and ca-key.pem)."),
        host: list[str] = typer.Option([], help="Extra DNS names or IP addresses for the certificate."),
        days: int = typer.Option(365, help="Validity in days."),
    ) -> None:
        """Issue one more certificate from the local CA (e.g. for a client tool on another host)."""
        target = directory or _default_dir()
        issue_certificate(target, identity, days, host)
        print(f"issued {target / (identity + '.pem')}")

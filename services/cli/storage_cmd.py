"""``aidc dataset upload|list|show|download|delete``: tenants' datasets in the storage service."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from services.cli.session import CliSession, open_session
from services.gen.aidc.storage.v1 import storage_service_pb2 as pb
from services.mesh.errors import AlreadyExists, InvalidArgument
from services.mesh.memory import tune_allocator
from services.storage.client import StorageClient

__all__ = ["register", "dataset_app"]

_T = TypeVar("_T")

#: Files at least this large get a progress bar (on a terminal).
PROGRESS_THRESHOLD = 8 * 1024 * 1024

dataset_app = typer.Typer(
    help="Upload, list, show, download and delete datasets (encrypted at rest).", no_args_is_help=True
)
_out = Console(highlight=False, soft_wrap=False)
_err = Console(stderr=True, highlight=False)

TenantOption = Annotated[str, typer.Option("--tenant", "-t", help="The tenant; default: your own.", show_default=False)]
NameArgument = Annotated[str, typer.Argument(help="The dataset's name, e.g. support-tickets.")]
VersionOption = Annotated[int, typer.Option("--version", "-v", min=0, help="A version; 0 means the latest.")]

_FORMATS = {"csv": pb.DATA_FORMAT_CSV, "jsonl": pb.DATA_FORMAT_JSONL}
_MASK_KINDS = {
    "email": pb.PII_KIND_EMAIL,
    "phone": pb.PII_KIND_PHONE,
    "id": pb.PII_KIND_ID_NUMBER,
    "card": pb.PII_KIND_BANK_CARD,
}


def register(app: typer.Typer) -> None:
    """Adds the ``dataset`` command group to the CLI."""
    app.add_typer(dataset_app, name="dataset")


def _run(work: Callable[[StorageClient], Awaitable[_T]]) -> _T:
    tune_allocator()  # uploads and downloads move megabyte messages (services.mesh.memory)

    async def main() -> _T:
        async with open_session() as session:
            return await work(_client(session))

    return asyncio.run(main())


def _client(session: CliSession) -> StorageClient:
    return StorageClient(session.channel("storage"))


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return datetime.fromtimestamp(stamp.seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@contextmanager
def _progress(total: int | None, what: str) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr for large transfers on a terminal; a no-op otherwise."""
    show = _err.is_terminal and (total is None or total >= PROGRESS_THRESHOLD)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
        disable=not show,
    )
    with progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def _parse_metadata(items: list[str]) -> dict[str, str]:
    metadata = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--metadata takes key=value, not {item!r}")
        metadata[key] = value
    return metadata


def _describe(info: pb.ObjectInfo) -> None:
    rows = [
        ("dataset", f"{info.tenant}/{info.name}"),
        ("version", str(info.version)),
        ("size", f"{_size(info.size_bytes)} ({info.size_bytes} bytes)"),
        ("sha256", info.sha256),
        ("content type", info.content_type),
        ("created", f"{_when(info.create_time)} by {info.created_by}"),
        ("tenant key", info.key_id + ("  (destroyed: content unreadable)" if info.shredded else "")),
    ]
    if info.HasField("text_dataset"):
        text = info.text_dataset
        labels = ", ".join(f"{lc.label} ({lc.count})" for lc in text.labels[:20])
        more = f", ... {len(text.labels) - 20} more" if len(text.labels) > 20 else ""
        rows += [
            ("format", pb.DataFormat.Name(text.format).removeprefix("DATA_FORMAT_").lower()),
            ("columns", f"text={text.text_column} label={text.label_column}"),
            ("rows", str(text.row_count)),
            ("labels", labels + more),
        ]
    if info.HasField("masking"):
        counts = ", ".join(
            f"{pb.PiiKind.Name(c.kind).removeprefix('PII_KIND_').lower()}={c.count}" for c in info.masking.counts
        )
        rows.append(("masked", f"{info.masking.masked_total} spans in {info.masking.rows_affected} rows ({counts})"))
        how = "pseudonyms" if info.masking.mode == pb.MASKING_MODE_PSEUDONYMIZE else "placeholders"
        if info.masking.pseudonym_key_id:
            how += f" (pseudonym key {info.masking.pseudonym_key_id})"
        if info.masking.phone_regions:
            how += f"; phone regions {', '.join(info.masking.phone_regions)}"
        rows.append(("masking", how))
    for key, value in sorted(info.metadata.items()):
        rows.append((f"metadata {key}", value))
    table = Table(show_header=False, box=None)
    for row in rows:
        table.add_row(*row)
    _out.print(table)


@dataset_app.command("upload")
def upload(
    name: NameArgument,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The file to upload.")],
    tenant: TenantOption = "",
    description: Annotated[str, typer.Option(help="Description, when the dataset is created.")] = "",
    text_format: Annotated[
        str, typer.Option("--format", help="Validate as a text dataset: csv or jsonl (default: opaque bytes).")
    ] = "",
    text_column: Annotated[str, typer.Option(help="Column (or JSON key) holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column (or JSON key) holding the label.")] = "label",
    mask: Annotated[
        bool,
        typer.Option("--mask", help="Mask personal data in the text column with [EMAIL], [PHONE]... (needs --format)."),
    ] = False,
    mask_kinds: Annotated[
        list[str] | None, typer.Option("--mask-kind", help="Only these kinds: email, phone, id, card (repeatable).")
    ] = None,
    pseudonymize: Annotated[
        bool,
        typer.Option(
            "--pseudonymize",
            help="Replace personal data by keyed pseudonyms, [PHONE:3f9a...]: equal values give equal tokens.",
        ),
    ] = False,
    phone_regions: Annotated[
        list[str] | None,
        typer.Option("--phone-region", help="Countries whose phone formats to recognise (repeatable; default CN, US)."),
    ] = None,
    content_type: Annotated[str, typer.Option(help="MIME type stored with the version.")] = "",
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="A key=value label (repeatable).")
    ] = None,
) -> None:
    """Upload FILE as a new version of dataset NAME (created if it does not exist)."""
    text_dataset = None
    if text_format:
        if text_format not in _FORMATS:
            raise InvalidArgument("--format must be csv or jsonl")
        text_dataset = pb.TextDatasetSpec(
            format=_FORMATS[text_format], text_column=text_column, label_column=label_column
        )
    masking = None
    if mask or mask_kinds or pseudonymize or phone_regions:
        unknown = [k for k in mask_kinds or [] if k not in _MASK_KINDS]
        if unknown:
            raise InvalidArgument(f"--mask-kind must be one of {', '.join(_MASK_KINDS)} (not {', '.join(unknown)})")
        masking = pb.MaskingOptions(
            enabled=True,
            kinds=[_MASK_KINDS[k] for k in mask_kinds or []],
            mode=pb.MASKING_MODE_PSEUDONYMIZE if pseudonymize else pb.MASKING_MODE_PLACEHOLDER,
            phone_regions=phone_regions or [],
        )
    labels = _parse_metadata(metadata or [])
    size = os.stat(file).st_size

    async def work(client: StorageClient) -> pb.ObjectInfo:
        try:
            await client.create_dataset(tenant, name, description)
        except AlreadyExists:
            pass
        with _progress(size, f"uploading {file.name}") as advance:
            return await client.upload(
                tenant,
                name,
                file,
                content_type=content_type,
                text_dataset=text_dataset,
                masking=masking,
                metadata=labels,
                progress=advance,
            )

    info = _run(work)
    typer.echo(f"uploaded {info.tenant}/{info.name} version {info.version}")
    _describe(info)


@dataset_app.command("list")
def list_datasets(tenant: TenantOption = "") -> None:
    """List the datasets of a tenant."""
    datasets = _run(lambda client: client.list_datasets(tenant))
    table = Table("name", "latest version", "created", "description", title=None)
    for d in datasets:
        table.add_row(d.name, str(d.latest_version), _when(d.create_time), d.description)
    _out.print(table)


@dataset_app.command("show")
def show(name: NameArgument, tenant: TenantOption = "", version: VersionOption = 0) -> None:
    """Show one version of a dataset (the latest by default) and list all its versions."""

    async def work(client: StorageClient) -> tuple[pb.ObjectInfo, list[pb.ObjectInfo]]:
        info = await client.stat(tenant, name, version=version)
        versions = await client.list_all(tenant, kind=pb.OBJECT_KIND_DATASET, name_prefix=name, all_versions=True)
        return info, [v for v in versions if v.name == name]

    info, versions = _run(work)
    _describe(info)
    table = Table("version", "size", "sha256", "created", "by")
    for v in versions:
        table.add_row(str(v.version), _size(v.size_bytes), v.sha256[:16], _when(v.create_time), v.created_by)
    _out.print(table)


@dataset_app.command("download")
def download(
    name: NameArgument,
    tenant: TenantOption = "",
    version: VersionOption = 0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it; default: ./NAME in this folder.")
    ] = None,
) -> None:
    """Download a dataset version into a file, which appears only once every byte arrived and verified."""
    target = output or Path(name)

    async def work(client: StorageClient) -> pb.ObjectInfo:
        with _progress(None, f"downloading {name}") as advance:
            return await client.download_to(tenant, name, target, version=version, progress=advance)

    info = _run(work)
    typer.echo(f"downloaded {info.tenant}/{info.name} version {info.version} to {target} ({_size(info.size_bytes)})")


@dataset_app.command("delete")
def delete(
    name: NameArgument,
    tenant: TenantOption = "",
    version: Annotated[int, typer.Option("--version", "-v", min=0, help="Delete only this version.")] = 0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete the whole dataset without asking.")] = False,
) -> None:
    """Delete one version (--version) or the whole dataset with all its versions."""
    if not version and not yes:
        typer.confirm(f"delete dataset {name} and all its versions?", abort=True)
    deleted = _run(lambda client: client.delete(tenant, name, version=version, all_versions=not version))
    which = ", ".join(map(str, deleted)) or "none"
    typer.echo(f"deleted {name}: versions {which}" + ("" if version else " (and the dataset)"))

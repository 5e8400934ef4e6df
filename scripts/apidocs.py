"""Generates the API reference in docs/api/ from the protos' comments (or checks that it is fresh).

Every service, method, message, field and enum value of protos/aidc is documented with its comment. Each method's
status codes come from two places: one table (below, and at the top of docs/api/README.md) of the codes every RPC can
return by the kind of its permission rule (public, authenticated, tenant, platform; mesh-only), read from the
services' own permission tables, plus the codes its proto comment states (in the method's comment or in its request's
field comments). Which endpoint serves each method (tenant and mesh, or mesh only) also comes from the tables.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DOCS = ROOT / "docs" / "api"
sys.path.insert(0, str(ROOT))

#: Codes a method's comment may state; the common ones below are listed for every method anyway.
_STATUS_NAMES = (
    "CANCELLED",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
_STATUS = re.compile(r"\b(" + "|".join(_STATUS_NAMES) + r")\b")


@dataclass(frozen=True)
class Common:
    """A status code every RPC of some kind can return, and when."""

    code: str
    when: str
    applies: str  # "all", "authenticated" (not public), "checked" (tenant/platform rule), "mesh_only"


#: The one table of codes that follow from the runtime rather than from a method: by the kind of the method's rule.
COMMON: tuple[Common, ...] = (
    Common(
        "INVALID_ARGUMENT",
        "a field is malformed or out of range, a repeated field or map holds more items than "
        "its limit (256 unless declared), or the request bytes do not decode",
        "all",
    ),
    Common(
        "UNAUTHENTICATED",
        "no bearer token, or one that is malformed, tampered, expired, revoked or signed by a retired key",
        "authenticated",
    ),
    Common(
        "PERMISSION_DENIED",
        "the caller's roles do not allow it: the rule's resource and action in the tenant (or "
        "the platform scope), or what the method's own checks require",
        "checked",
    ),
    Common(
        "PERMISSION_DENIED",
        "called on the tenant endpoint: only mesh services call it, on the mesh endpoint",
        "mesh_only",
    ),
    Common(
        "DEADLINE_EXCEEDED", "the caller's deadline passed (it is forwarded to every call the service makes)", "all"
    ),
    Common(
        "UNAVAILABLE",
        "the service, or a service it needs (auth for token keys and decisions), is not reachable; retry with backoff",
        "all",
    ),
)


@dataclass(frozen=True)
class RuleInfo:
    kind: str  # public | authenticated | tenant | platform
    permission: str  # "resource:action" or ""
    mesh_only: bool


def _rules() -> dict[str, RuleInfo]:
    """Full method name ("pkg.Service.Method") -> its rule, from every service's permission table."""
    from services.mesh.config import SERVICE_NAMES

    found: dict[str, RuleInfo] = {}
    for name in SERVICE_NAMES:
        try:
            table = importlib.import_module(f"services.{name}.permissions").PERMISSIONS
        except ModuleNotFoundError:
            continue
        for method, rule in table.items():
            permission = f"{rule.resource}:{rule.action}" if rule.resource else ""
            found[method.strip("/").replace("/", ".")] = RuleInfo(rule.scope.value, permission, rule.mesh_only)
    return found


def _descriptors() -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", "--include_source_info", f"--descriptor_set_out={out}"]
        if protoc.main([*args, *files]) != 0:
            raise SystemExit("protoc failed")
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return descriptors


class _Comments:
    """The leading comments of one file's elements, by their source path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}

    def of(self, *path: int) -> str:
        text = self._by_path.get(tuple(path), "")
        return " ".join(line.strip() for line in text.strip().splitlines())


def _type_name(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if field.type_name:
        name = field.type_name.lstrip(".")
        return name[len(package) + 1 :] if name.startswith(package + ".") else name
    kind = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type)
    return kind.removeprefix("TYPE_").lower()


def _anchor(name: str) -> str:
    return name.lower().replace(".", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def _link(type_name: str, local: set[str]) -> str:
    return f"[`{type_name}`](#{_anchor(type_name)})" if type_name in local else f"`{type_name}`"


def _statuses(method_comment: str, request_comments: Iterable[str], rule: RuleInfo | None) -> list[str]:
    """The method's status codes: the common ones for its rule, then those its comments name."""
    codes: list[str] = []
    for common in COMMON:
        applies = {
            "all": True,
            "authenticated": rule is None or rule.kind != "public",
            "checked": rule is None or rule.kind != "public",
            "mesh_only": rule is not None and rule.mesh_only,
        }[common.applies]
        if applies and common.code not in codes:
            codes.append(common.code)
    stated = _STATUS.findall(" ".join([method_comment, *request_comments]))
    codes += [code for code in dict.fromkeys(stated) if code not in codes]
    return codes


def _render_file(file: descriptor_pb2.FileDescriptorProto, rules: dict[str, RuleInfo]) -> str:
    comments = _Comments(file)
    package = file.package
    local = {m.name for m in file.message_type} | {e.name for e in file.enum_type}
    messages = {m.name: (i, m) for i, m in enumerate(file.message_type)}
    out = [f"# `{package}`", "", f"Generated from `protos/{file.name}` by `scripts/apidocs.py`; do not edit.", ""]
    for s_index, service in enumerate(file.service):
        full = f"{package}.{service.name}"
        out += [f"## {service.name}", "", comments.of(6, s_index), ""]
        out += ["| method | request → response | rule | endpoints |", "| --- | --- | --- | --- |"]
        for method in service.method:
            rule = rules.get(f"{full}.{method.name}")
            request = _type_name(descriptor_pb2.FieldDescriptorProto(type_name=method.input_type), package)
            response = _type_name(descriptor_pb2.FieldDescriptorProto(type_name=method.output_type), package)
            stream_in = "stream " if method.client_streaming else ""
            stream_out = "stream " if method.server_streaming else ""
            shown = f"{stream_in}{_link(request, local)} → {stream_out}{_link(response, local)}"
            kind = "" if rule is None else (f"{rule.kind} `{rule.permission}`" if rule.permission else rule.kind)
            where = "mesh only" if rule is not None and rule.mesh_only else "tenant, mesh"
            out.append(f"| [{method.name}](#{_anchor(service.name + method.name)}) | {shown} | {kind} | {where} |")
        out.append("")
        for m_index, method in enumerate(service.method):
            rule = rules.get(f"{full}.{method.name}")
            comment = comments.of(6, s_index, 2, m_index)
            request_name = method.input_type.rsplit(".", 1)[-1]
            request_comments: list[str] = []
            if request_name in messages:
                r_index, request = messages[request_name]
                request_comments = [comments.of(4, r_index, 2, f) for f in range(len(request.field))]
            out += [f'<a id="{_anchor(service.name + method.name)}"></a>', f"### {service.name}.{method.name}", ""]
            out += [comment or "(no comment)", ""]
            out += [f"Status codes: {', '.join(_statuses(comment, request_comments, rule))}.", ""]
    if file.message_type:
        out += ["## Messages", ""]
    for m_index, message in enumerate(file.message_type):
        out += [f"### {message.name}", "", comments.of(4, m_index) or "(no comment)", ""]
        if message.field:
            out += ["| field | type | description |", "| --- | --- | --- |"]
            for f_index, field in enumerate(message.field):
                type_name = _type_name(field, package)
                repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
                entry = next((n for n in message.nested_type if n.name == type_name.rsplit(".", 1)[-1]), None)
                if entry is not None and entry.options.map_entry:
                    key, value = (_type_name(f, package) for f in entry.field)
                    shown = f"map<`{key}`, {_link(value, local)}>"
                else:
                    shown = ("repeated " if repeated else "") + _link(type_name, local)
                if field.HasField("oneof_index") and not field.proto3_optional:
                    shown += f" (oneof `{message.oneof_decl[field.oneof_index].name}`)"
                description = comments.of(4, m_index, 2, f_index)
                out.append(f"| `{field.name}` | {shown} | {_cell(description)} |")
            out.append("")
    if file.enum_type:
        out += ["## Enums", ""]
    for e_index, enum in enumerate(file.enum_type):
        out += [f"### {enum.name}", "", comments.of(5, e_index) or "(no comment)", ""]
        out += ["| value | number | description |", "| --- | --- | --- |"]
        for v_index, value in enumerate(enum.value):
            out.append(f"| `{value.name}` | {value.number} | {_cell(comments.of(5, e_index, 2, v_index))} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _index(files: list[descriptor_pb2.FileDescriptorProto]) -> str:
    from services.serving.gateway import GATEWAY_PERMISSIONS, INFERENCE_SERVICE

    out = [
        "# aidc API reference",
        "",
        "Generated from the comments of `protos/` by `scripts/apidocs.py` (`make apidocs`; `make proto-check` fails "
        "when it is stale). Clients in any language are generated from the same files.",
        "",
        "Every service listens twice: on its **tenant endpoint** (TLS trusting the platform's CA file, no client "
        "certificate, `authorization: Bearer <token>` on each call; `aidc up` prints the addresses, a cluster serves "
        "them all at one address through its Gateway) and on its **mesh endpoint** (mutual TLS; for the services "
        "themselves). Methods marked *mesh only* are refused on the tenant endpoint with PERMISSION_DENIED.",
        "",
        "## Status codes every method can return",
        "",
        "Each method lists its codes: those below that apply to its rule, then those its own documentation states. "
        "A refused request changes nothing. INTERNAL is never returned on purpose (it hides a defect; its message "
        "says nothing more).",
        "",
        "| code | when | methods |",
        "| --- | --- | --- |",
    ]
    applies = {
        "all": "all",
        "authenticated": "all but public ones",
        "checked": "all but public ones",
        "mesh_only": "mesh-only methods",
    }
    out += [f"| {c.code} | {c.when} | {applies[c.applies]} |" for c in COMMON]
    out += ["", "## Services", ""]
    for file in files:
        page = f"{file.package}.md"
        for service in file.service:
            out.append(f"- [`{file.package}.{service.name}`]({page}) ({len(service.method)} methods)")
        if not file.service:
            out.append(f"- [`{file.package}`]({page}) (shared messages)")
    served = sorted(method.rsplit("/", 1)[1] for method, _ in GATEWAY_PERMISSIONS.items())
    out += [
        f"- `{INFERENCE_SERVICE}` (KServe v2, Triton's own definition, on the serving endpoints): "
        + ", ".join(f"`{name}`" for name in served)
        + ". Models are named as registered (`sentiment`, or `acme/sentiment` for another tenant's); every other "
        "method of Triton's service answers UNIMPLEMENTED.",
        "",
    ]
    return "\n".join(out)


def render() -> dict[str, str]:
    """Every page of the reference, by file name."""
    rules = _rules()
    files = [f for f in _descriptors().file if f.package.startswith("aidc.")]
    pages = {f"{file.package}.md": _render_file(file, rules) for file in files}
    pages["README.md"] = _index(files)
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/api is stale")
    args = parser.parse_args()
    pages = render()
    if args.check:
        current = {p.name: p.read_text() for p in DOCS.glob("*.md")} if DOCS.exists() else {}
        stale = sorted(name for name in pages.keys() | current.keys() if pages.get(name) != current.get(name))
        if stale:
            print("docs/api is stale, run `make apidocs`:", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("docs/api is fresh")
        return 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for old in DOCS.glob("*.md"):
        if old.name not in pages:
            old.unlink()
    for name, text in pages.items():
        (DOCS / name).write_text(text)
    print(f"generated {len(pages)} pages in {DOCS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

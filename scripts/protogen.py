"""Generates the Python protobuf/gRPC code for protos/ into services/gen (or checks that it is fresh)."""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "services" / "gen"
# protoc writes imports as `from aidc.x.v1 import y_pb2`; the generated tree lives inside services.gen.
_IMPORT = re.compile(r"^(from|import) aidc\.", re.MULTILINE)


def generate(out: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = _IMPORT.sub(r"\1 services.gen.aidc.", path.read_text())
        path.write_text(text)
    for directory in [out, *[d for d in out.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()
    (out / "__init__.py").write_text('"""Generated protobuf and gRPC code; regenerate with `make proto`."""\n')


def _same_tree(a: Path, b: Path) -> list[str]:
    stale = []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    for rel in sorted(files_a ^ files_b):
        stale.append(str(rel))
    for rel in sorted(files_a & files_b):
        if not filecmp.cmp(a / rel, b / rel, shallow=False):
            stale.append(str(rel))
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if services/gen is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "gen"
            generate(fresh)
            stale = _same_tree(fresh, GEN) if GEN.exists() else ["services/gen missing"]
        if stale:
            print("generated code is stale, run `make proto`:", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("generated code is fresh")
        return 0
    if GEN.exists():
        shutil.rmtree(GEN)
    generate(GEN)
    print(f"generated {GEN.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate ``services/rpc/generated`` from ``protos/`` (the generated code is committed).

``python -m services.rpc.codegen`` regenerates it in place (``make protos``);
``python -m services.rpc.codegen --check`` generates into a temporary directory and exits 1,
listing the files that differ, when the committed code is out of date with the protos.

protoc runs with a virtual include path (``-Iservices/rpc/generated=protos``), so the
generated modules import each other package-absolutely
(``from services.rpc.generated.flywheel.reward.v1 import reward_pb2``), with no sys.path tricks.
Only protos that declare a ``service`` get a ``*_pb2_grpc.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
GENERATED_PACKAGE = Path("services/rpc/generated")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PACKAGE_DOCSTRING = '"""Generated from protos/ by ``python -m services.rpc.codegen``; do not edit."""\n'
SERVICE_RE = re.compile(r"^\s*service\s+\w+\s*\{", re.MULTILINE)


def well_known_protos_dir() -> Path:
    """grpc_tools' bundled ``google/protobuf/*.proto`` (struct.proto and friends)."""
    import grpc_tools

    return Path(grpc_tools.__file__).parent / "_proto"


def proto_files(proto_root: Path) -> list[Path]:
    files = sorted(proto_root.rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    return files


def run_protoc(proto_root: Path, out_root: Path, files: list[Path], grpc: bool) -> None:
    plugins = ["--python_out", str(out_root), "--pyi_out", str(out_root)]
    if grpc:
        plugins += ["--grpc_python_out", str(out_root)]
    command = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{GENERATED_PACKAGE.as_posix()}={proto_root}", f"-I{well_known_protos_dir()}",
        *plugins, *map(str, files),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed (exit {proc.returncode}):\n{proc.stderr.strip()}\ncommand: {command}")


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate into ``out_root/services/rpc/generated`` (plus ``__init__.py`` in every
    package directory); returns the written files relative to ``out_root``."""
    proto_root = proto_root.resolve()
    files = proto_files(proto_root)
    with_service = [f for f in files if SERVICE_RE.search(f.read_text())]
    messages_only = [f for f in files if f not in with_service]
    if with_service:
        run_protoc(proto_root, out_root, with_service, grpc=True)
    if messages_only:
        run_protoc(proto_root, out_root, messages_only, grpc=False)
    package_root = out_root / GENERATED_PACKAGE
    for directory in [package_root, *sorted(p for p in package_root.rglob("*") if p.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text(PACKAGE_DOCSTRING if directory == package_root else "")
    return sorted(p.relative_to(out_root) for p in package_root.rglob("*") if p.is_file())


def committed_files(repo: Path) -> list[Path]:
    """Files under ``repo/services/rpc/generated`` that codegen owns (no caches)."""
    package_root = repo / GENERATED_PACKAGE
    if not package_root.is_dir():
        return []
    return sorted(
        p.relative_to(repo) for p in package_root.rglob("*")
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    )


def find_drift(proto_root: Path = PROTO_ROOT, repo: Path = REPO) -> list[str]:
    """One line per generated file that differs from, is missing in, or is extra in ``repo``."""
    with tempfile.TemporaryDirectory(prefix="flywheel-codegen-") as tmp:
        fresh = generate(Path(tmp), proto_root)
        committed = committed_files(repo)
        drift = [f"missing: {p}" for p in fresh if p not in committed]
        drift += [f"stale (no proto generates it): {p}" for p in committed if p not in fresh]
        drift += [
            f"differs: {p}" for p in fresh
            if p in committed and (Path(tmp) / p).read_bytes() != (repo / p).read_bytes()
        ]
    return sorted(drift)


def regenerate(proto_root: Path = PROTO_ROOT, repo: Path = REPO) -> list[Path]:
    """Rewrite ``repo/services/rpc/generated`` from the protos, removing stale files."""
    with tempfile.TemporaryDirectory(prefix="flywheel-codegen-") as tmp:
        fresh = generate(Path(tmp), proto_root)
        for stale in set(committed_files(repo)) - set(fresh):
            (repo / stale).unlink()
        for path in fresh:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / path, repo / path)
    return fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.rpc.codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed code differs (drift)")
    parser.add_argument("--protos", type=Path, default=PROTO_ROOT, help=f"proto root (default: {PROTO_ROOT})")
    parser.add_argument("--repo", type=Path, default=REPO, help=f"where services/rpc/generated lives (default: {REPO})")
    args = parser.parse_args(argv)
    if args.check:
        drift = find_drift(args.protos, args.repo)
        if drift:
            print(f"generated code in {args.repo / GENERATED_PACKAGE} is out of date with {args.protos}:")
            for line in drift:
                print(f"  {line}")
            print("regenerate with: make protos  (python -m services.rpc.codegen)")
            return 1
        print(f"generated code is up to date with {args.protos}")
        return 0
    written = regenerate(args.protos, args.repo)
    print(f"generated {len(written)} files into {args.repo / GENERATED_PACKAGE}{os.sep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""For benchmarks that measure this checkout against an earlier commit in one run: the earlier
commit's code comes from a temporary git worktree and runs from this venv, as `flywheel`
does (its own ``services`` first on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
BEFORE_17 = "6ffe631"  # the last commit before issue #17's changes


@contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """A detached worktree of ``rev`` at ``path`` while the block runs."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


def flywheel(tree: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run `flywheel ARGS` from ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())", *args], env

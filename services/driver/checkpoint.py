"""Run checkpoints: ``OUT/checkpoints/step-000042/``, written atomically, the last K kept.

A checkpoint directory holds
- ``learner/``: the DeepSpeed checkpoint of the policy (and PPO critic): weights,
  optimizer and scheduler state, written by every learner rank;
- ``hf/``: the policy's config and tokenizer files (no weights), so that
  ``flywheel export`` makes a Hugging Face directory from the checkpoint alone;
- ``config.yaml``: the resolved run config;
- ``driver_state.json``: step, policy version, prompt cursor and epoch, selection and
  diagnostics state, RNG states, the model fingerprint, and ``files``: the manifest of every
  other file of the checkpoint (relative path -> size in bytes);
- ``pending_rollouts.pb``: (streaming runs) the batch generated for the next step.

Atomicity: everything is written into ``.tmp-step-000042-<pid>/`` next to the final
directory and renamed into place at the end (a rename within one filesystem is atomic).
``driver_state.json`` is written last. A directory is a checkpoint only if it is named
``step-NNNNNN`` and holds ``driver_state.json``, so a half-written one is never resumed.
With several nodes, ``OUT`` must be on storage that every learner node can write.

Damage after the fact (a disk that filled, a copy cut short) is found from the manifest
before Ray starts (:func:`verify_checkpoint`: every file there, of its size; sizes only, no
hashing of the weights). ``--resume`` then falls back to the newest intact checkpoint, with
a warning naming the damaged file; a checkpoint named explicitly is refused, naming the file
and the previous intact checkpoint. A checkpoint written before the manifest loads unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from services.core.errors import UserError
from services.rpc.trajectory_io import trajectories_by_step, write_trajectories

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "driver_state.json"
MANIFEST_KEY = "files"  # in driver_state.json: {relative path: size in bytes} of every other file
STEP_DIR = re.compile(r"^step-(\d{6,})$")
# the policy files a checkpoint copies (no weights): enough to rebuild the HF directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are not what it recorded; ``problem`` names the file."""

    def __init__(self, checkpoint: Path, problem: str):
        super().__init__(f"checkpoint: {problem}")
        self.checkpoint, self.problem = checkpoint, problem


def model_fingerprint(policy_dir: str | Path) -> str:
    """Hash of the policy's config.json (architecture, sizes, vocab): a checkpoint only
    resumes into the same model shape."""
    config = json.loads((Path(policy_dir) / "config.json").read_text())
    relevant = {k: v for k, v in sorted(config.items()) if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_step(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    if match is None or not (path / STATE_FILE).is_file():
        return None
    return int(match.group(1))


class CheckpointStore:
    """The checkpoints under ``root`` (``OUT/checkpoints``)."""

    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(checkpoint_step(p), p) for p in self.root.iterdir() if p.is_dir()]
        return [p for step, p in sorted((s, p) for s, p in found if s is not None)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step``."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step-*"):  # left by a process that died mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step-{step:06d}-{os.getpid()}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int, state: dict) -> Path:
        """Write the driver state last, with the manifest of the files written before it, rename
        ``tmp`` into place, drop all but the last K up to ``step``. Checkpoints of later steps
        (a run resumed from an earlier one, e.g. past a damaged one) are left alone until this
        run writes those steps again, so the one just written is never dropped."""
        state = {"format_version": FORMAT_VERSION, **state, "step": step, MANIFEST_KEY: file_sizes(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
        final = self.root / f"step-{step:06d}"
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in [p for p in self.complete() if checkpoint_step(p) <= step][: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def file_sizes(folder: Path) -> dict[str, int]:
    """{path relative to ``folder``: size in bytes} of every file under it, ``driver_state.json`` aside."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*")) if path.is_file() and path != folder / STATE_FILE
    }


def copy_policy_files(policy_dir: str | Path, target: Path) -> None:
    """The policy directory's config and tokenizer files, without its weights."""
    target.mkdir(parents=True, exist_ok=True)
    for path in Path(policy_dir).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copy2(path, target / path.name)


def read_state(checkpoint: str | Path) -> dict:
    """``driver_state.json`` of a checkpoint directory, with a clear error for anything else."""
    path = Path(checkpoint)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(
            f"checkpoint: '{checkpoint}' is not a complete Flywheel checkpoint (no {STATE_FILE}); "
            "pass a directory like OUT/checkpoints/step-000010"
        )
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DamagedCheckpoint(path, f"{state_file} is not valid JSON ({exc}); the checkpoint is damaged") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(
            f"checkpoint: '{checkpoint}' has format version {version}, "
            f"this Flywheel reads version {FORMAT_VERSION}"
        )
    return state


def damaged_file(checkpoint: Path, state: dict) -> str | None:
    """The first file of the checkpoint's manifest that is missing or not of its recorded
    size, said as '<path> is damaged (truncated: X of Y bytes)'; None when every one is as
    recorded, or the checkpoint has no manifest (written before it)."""
    manifest = state.get(MANIFEST_KEY)
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or not all(type(size) is int for size in manifest.values()):
        return f"{checkpoint / STATE_FILE} is damaged (its '{MANIFEST_KEY}' is not a mapping of sizes)"
    for name, size in sorted(manifest.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing (the checkpoint recorded {size} bytes)"
        actual = path.stat().st_size
        if actual != size:
            how = "truncated" if actual < size else "longer than recorded"
            return f"{path} is damaged ({how}: {actual} of {size} bytes)"
    return None


def verify_checkpoint(checkpoint: Path) -> dict:
    """:func:`read_state`, and every file of the manifest there with its size; returns the
    state. :class:`DamagedCheckpoint` names the first file that is not."""
    state = read_state(checkpoint)
    problem = damaged_file(checkpoint, state)
    if problem is not None:
        raise DamagedCheckpoint(checkpoint, problem)
    return state


def newest_intact(store: CheckpointStore) -> Path:
    """The newest complete checkpoint of ``store`` that verifies, with a warning on stderr
    naming the damaged file of each newer one; UserError naming the newest one's when none is
    intact."""
    damaged: list[str] = []
    for checkpoint in reversed(store.complete()):
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpoint as exc:
            damaged.append(exc.problem)
            continue
        for problem in damaged:
            print(f"warning: checkpoint: {problem}; using {checkpoint} instead, the newest intact checkpoint",
                  file=sys.stderr)
        return checkpoint
    others = f" (the {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""
    raise UserError(f"checkpoint: {damaged[0]}; no checkpoint under {store.root} is intact{others}")


def previous_intact(checkpoint: Path) -> Path | None:
    """The newest intact checkpoint beside ``checkpoint`` of an earlier step (None: none)."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return None
    for earlier in reversed([p for p in CheckpointStore(checkpoint.parent).complete() if checkpoint_step(p) < step]):
        try:
            verify_checkpoint(earlier)
        except UserError:
            continue
        return earlier
    return None


def verify_named_checkpoint(checkpoint: Path, setting: str) -> dict:
    """:func:`verify_checkpoint` of a checkpoint the user named: a damaged one is refused
    (exit 2), naming the file and the previous intact checkpoint to use instead."""
    try:
        return verify_checkpoint(checkpoint)
    except DamagedCheckpoint as exc:
        previous = previous_intact(checkpoint)
        hint = (f"{previous} is the previous intact checkpoint" if previous is not None
                else "no earlier checkpoint beside it is intact")
        raise UserError(f"{setting}: {exc.problem}; {hint}") from None


def resolve_resume(resume_from: str | None, resume_latest: bool, out: Path) -> Path | None:
    """The checkpoint to resume: ``checkpoint.resume_from`` (a checkpoint directory, or a
    checkpoints folder whose latest complete one is taken), or with ``--resume`` the latest
    under OUT/checkpoints. ``--resume`` with none there starts fresh (and says so). Each is
    verified (:func:`verify_checkpoint`): a damaged checkpoint named by ``resume_from`` is
    refused; one taken as the latest of a folder gives way to the newest intact one, with a
    warning naming the damaged file."""
    if resume_from:
        path = Path(resume_from).expanduser()
        if (path / STATE_FILE).is_file():
            verify_named_checkpoint(path, "checkpoint.resume_from")
            return path
        store = CheckpointStore(path)
        if not path.is_dir() or store.latest() is None:
            raise UserError(f"checkpoint.resume_from: no complete checkpoint at '{resume_from}'")
        return newest_intact(store)
    if resume_latest:
        store = CheckpointStore(out / "checkpoints")
        if store.latest() is None:
            print(f"--resume: no complete checkpoint under {out / 'checkpoints'}; starting from step 0")
            return None
        return newest_intact(store)
    return None



def write_policy(target: Path, policy_dir: str | Path, weights: dict) -> Path:
    """A HF policy directory at ``target``: ``policy_dir``'s config and tokenizer, ``weights``
    as model.safetensors."""
    from safetensors.torch import save_file

    copy_policy_files(policy_dir, target)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def stopped_hint(out: Path, step: int) -> str:
    """What a run that failed after step ``step`` tells its user: where to continue from."""
    latest = CheckpointStore(out / "checkpoints").latest()
    where = (f"`flywheel train ... --out {out} --resume` continues from {latest}" if latest is not None
             else "no checkpoint was written yet (checkpoint.every_steps), so a new run starts from step 1")
    return f"the run stopped during step {step + 1} (steps 1..{step} are in metrics.jsonl); {where}"



def trim_metrics(path: Path, last_step: int) -> int:
    """Drop metrics.jsonl records after ``last_step`` (steps a resumed run makes again) and a
    line that is not JSON (a crash cut the last one short). Written atomically; returns the
    records kept."""
    if not path.is_file():
        return 0
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d is not a whole JSON record (a crash cut it short?); dropping it", path, number)
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


PENDING_FILE = "pending_rollouts.pb"  # a streaming run's batches sampled for the steps after the checkpoint


def write_pending(path: Path, step: int, pending: list[tuple[list, float, dict]]) -> list[dict]:
    """The batches sampled ahead for steps ``step + 1 ..`` (each record's step: the step it is
    for) into ``path``; returns their rollout figures, for the checkpoint's state."""
    for ahead, (batch, _, _) in enumerate(pending, start=1):
        write_trajectories(path, batch, [None] * len(batch), step=step + ahead)
    return [dict(stats) for _, _, stats in pending]


def read_pending(path: Path, stats: list[dict] | dict) -> list[tuple[list, float, dict]]:
    """The batches a checkpoint saved for the next steps (``Driver.save_checkpoint``), in order.
    A checkpoint of max_staleness 1 from before the buffer saved one batch without steps and
    its figures as one dict."""
    if not path.is_file():
        return []
    by_step = trajectories_by_step(path)
    stats = [stats] if isinstance(stats, dict) else stats
    if len(stats) != len(by_step):
        raise UserError(f"checkpoint: {path} holds {len(by_step)} batches but the state names {len(stats)}")
    return [(batch, 0.0, dict(figures)) for batch, figures in zip(by_step.values(), stats)]


__all__ = [
    "CheckpointStore",
    "DamagedCheckpoint",
    "FORMAT_VERSION",
    "STATE_FILE",
    "checkpoint_step",
    "copy_policy_files",
    "stopped_hint",
    "write_policy",
    "model_fingerprint",
    "read_state",
    "resolve_resume",
    "verify_checkpoint",
    "verify_named_checkpoint",
    "newest_intact",
    "PENDING_FILE",
    "read_pending",
    "write_pending",
]

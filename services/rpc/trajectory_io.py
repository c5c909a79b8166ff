"""Rollout dumps: files of ``flywheel.trajectory.v1.Trajectory`` messages, each preceded by
its length as a base-128 varint (the framing protobuf's ``writeDelimitedTo`` uses), so any
protobuf runtime can read them and a file grows by appending.

``write_trajectories`` appends :class:`services.core.batch_types.Trajectory` objects, with their
rewards if given; ``read_trajectories`` yields them back as :class:`TrajectoryRecord`. Column
numbers come back as floats (protobuf Struct holds JSON numbers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from services.core.batch_types import Trajectory
from services.rpc.generated.flywheel.trajectory.v1 import trajectory_pb2
from services.rpc.struct_columns import dict_to_struct, struct_to_dict

log = logging.getLogger(__name__)
MAX_RECORD_BYTES = 1 << 30  # a length prefix above this means a corrupt file, not a record


@dataclass
class TrajectoryRecord:
    """One dumped trajectory with the reward fields it was written with (None / empty if not)."""

    trajectory: Trajectory
    reward: float | None = None
    member_scores: dict[str, float] = field(default_factory=dict)
    step: int | None = None


def encode_varint(value: int) -> bytes:
    """Unsigned base-128 varint, least significant group first."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(stream: BinaryIO) -> int | None:
    """The next varint from ``stream``; None at a clean end of file, ValueError if cut short."""
    result, shift = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            if shift == 0:
                return None
            raise ValueError("file ends inside a length prefix")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("length prefix longer than 10 bytes")


def to_message(
    trajectory: Trajectory, reward: float | None = None, member_scores: Mapping[str, float] | None = None,
    step: int | None = None,
) -> trajectory_pb2.Trajectory:
    message = trajectory_pb2.Trajectory(
        prompt_id=trajectory.prompt_id, prompt=trajectory.prompt, prompt_ids=list(trajectory.prompt_ids),
        response=trajectory.response, response_ids=list(trajectory.response_ids),
        logprobs=list(trajectory.logprobs), finish_reason=trajectory.finish_reason,
        policy_version=trajectory.policy_version, sample_index=trajectory.sample_index,
        columns=dict_to_struct(trajectory.columns, f"trajectory {trajectory.prompt_id!r} columns"),
        member_scores={name: float(score) for name, score in (member_scores or {}).items()},
        loss_mask=list(trajectory.loss_mask or []), env_reward=float(trajectory.env_reward),
        turns=[trajectory_pb2.Turn(role=role, start=start, end=end) for role, start, end in trajectory.turns or []],
        version_spans=[trajectory_pb2.VersionSpan(start=start, version=version)
                       for start, version in trajectory.version_spans or []],
        env_info={name: float(value) for name, value in trajectory.env_info.items()},
    )
    if reward is not None:
        message.reward = float(reward)
    if step is not None:
        message.step = int(step)
    return message


def from_message(message: trajectory_pb2.Trajectory) -> TrajectoryRecord:
    trajectory = Trajectory(
        prompt_id=message.prompt_id, prompt=message.prompt, prompt_ids=list(message.prompt_ids),
        response=message.response, response_ids=list(message.response_ids), logprobs=list(message.logprobs),
        finish_reason=message.finish_reason, policy_version=message.policy_version,
        sample_index=message.sample_index, columns=struct_to_dict(message.columns),
        loss_mask=list(message.loss_mask) or None, turns=[(t.role, t.start, t.end) for t in message.turns] or None,
        env_reward=message.env_reward,
        version_spans=[(s.start, s.version) for s in message.version_spans] or None,
        env_info=dict(message.env_info),
    )
    return TrajectoryRecord(
        trajectory,
        reward=message.reward if message.HasField("reward") else None,
        member_scores=dict(message.member_scores),
        step=message.step if message.HasField("step") else None,
    )


def write_trajectories(
    path: str | os.PathLike, trajectories: Sequence[Trajectory], rewards: Sequence[float] | None = None,
    member_scores: Mapping[str, Sequence[float]] | None = None, step: int | None = None,
) -> int:
    """Append ``trajectories`` to ``path`` (created with its parent directories if missing).

    ``rewards``: one aggregated reward per trajectory; ``member_scores``: ``{member name: one
    score per trajectory}`` (e.g. ``dict(zip(scores.member_names, scores.member_scores))``);
    ``step``: the training step, stored on every record. Returns the number of bytes written.
    """
    n = len(trajectories)
    if rewards is not None and len(rewards) != n:
        raise ValueError(f"{len(rewards)} rewards for {n} trajectories")
    for name, scores in (member_scores or {}).items():
        if len(scores) != n:
            raise ValueError(f"member '{name}' has {len(scores)} scores for {n} trajectories")
    chunks = []
    for i, trajectory in enumerate(trajectories):
        message = to_message(
            trajectory,
            reward=None if rewards is None else rewards[i],
            member_scores={name: scores[i] for name, scores in (member_scores or {}).items()},
            step=step,
        )
        payload = message.SerializeToString()
        chunks.append(encode_varint(len(payload)) + payload)
    data = b"".join(chunks)  # serialize everything first: a bad column leaves the file untouched
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)
    return len(data)


def read_trajectories(path: str | os.PathLike) -> Iterator[TrajectoryRecord]:
    """Every record in ``path``, in order; ValueError naming the file and byte offset if the
    file is truncated or corrupt."""
    with open(path, "rb") as f:
        while True:
            offset = f.tell()
            try:
                size = read_varint(f)
            except ValueError as exc:
                raise ValueError(f"{path}: corrupt record at byte {offset}: {exc}") from None
            if size is None:
                return
            if size > MAX_RECORD_BYTES:
                raise ValueError(f"{path}: corrupt record at byte {offset}: length prefix {size} is implausible")
            payload = f.read(size)
            if len(payload) != size:
                raise ValueError(f"{path}: truncated record at byte {offset}: expected {size} bytes, got {len(payload)}")
            message = trajectory_pb2.Trajectory()
            try:
                message.ParseFromString(payload)
            except Exception as exc:  # google.protobuf.message.DecodeError
                raise ValueError(f"{path}: corrupt record at byte {offset}: {exc}") from None
            yield from_message(message)


def trajectories_by_step(path: str | os.PathLike) -> dict[int | None, list[Trajectory]]:
    """``path``'s trajectories grouped by their records' step, in the order first seen (empty
    if there is no file)."""
    by_step: dict[int | None, list[Trajectory]] = {}
    if Path(path).is_file():
        for record in read_trajectories(path):
            by_step.setdefault(record.step, []).append(record.trajectory)
    return by_step


def trim_trajectories(path: str | os.PathLike, last_step: int) -> int:
    """Keep only records with ``step <= last_step`` (a resumed run writes later steps again);
    a torn record at the end (the process died mid-append) goes too. Returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept = []
    try:
        for record in read_trajectories(path):
            if record.step is None or record.step <= last_step:
                kept.append(record)
    except ValueError as exc:
        log.warning("%s; keeping the %d records before it", exc, len(kept))
    chunks = []
    for r in kept:
        payload = to_message(r.trajectory, r.reward, r.member_scores, r.step).SerializeToString()
        chunks.append(encode_varint(len(payload)) + payload)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    os.replace(tmp, path)
    return len(kept)


__all__ = [
    "TrajectoryRecord", "write_trajectories", "read_trajectories", "trajectories_by_step", "trim_trajectories",
    "to_message", "from_message", "encode_varint", "read_varint",
]

"""Rollout dumps: length-delimited flywheel.trajectory.v1.Trajectory messages, written by
appending and read back into batch_types.Trajectory with their reward fields."""

from __future__ import annotations

import io

import pytest

from services.core.batch_types import Trajectory
from services.rpc.generated.flywheel.trajectory.v1 import trajectory_pb2
from services.rpc.trajectory_io import encode_varint, read_trajectories, read_varint, write_trajectories


def make_trajectories() -> list[Trajectory]:
    return [
        Trajectory(
            prompt_id="arith-7", prompt="12+7=", prompt_ids=[5, 6, 7, 300], response="19", response_ids=[42, 2],
            logprobs=[-0.125, -1e-9], finish_reason="stop", policy_version=3, sample_index=1,
            columns={"task": "arithmetic", "answer": "19", "difficulty": 2, "tags": ["easy", None]},
        ),
        Trajectory(
            prompt_id="list-1", prompt="list 3 fruits:", prompt_ids=[9], response=" apple mango",
            response_ids=[11, 12, 13], logprobs=[-0.5, -2.25, -0.0625], finish_reason="length",
            policy_version=2**40, sample_index=0,
        ),
    ]


def test_varint_round_trip():
    for value in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        encoded = encode_varint(value)
        assert read_varint(io.BytesIO(encoded)) == value
    assert encode_varint(300) == b"\xac\x02"  # the protobuf encoding of 300
    assert read_varint(io.BytesIO(b"")) is None
    with pytest.raises(ValueError, match="inside a length prefix"):
        read_varint(io.BytesIO(b"\x80"))
    with pytest.raises(ValueError, match="non-negative"):
        encode_varint(-1)


def test_round_trip_with_rewards_and_append(tmp_path):
    path = tmp_path / "dumps" / "rollouts.pb"  # parent directory is created
    trajectories = make_trajectories()
    write_trajectories(
        path, trajectories, rewards=[0.75, -1.5], member_scores={"rm-a": [0.5, -1.0], "rm-b": [1.0, -2.0]}, step=12
    )
    write_trajectories(path, trajectories[:1])  # appended, without reward fields
    records = list(read_trajectories(path))
    assert len(records) == 3
    first, second, plain = records
    expected_columns = {"answer": "19", "difficulty": 2.0, "tags": ["easy", None], "task": "arithmetic"}
    assert first.trajectory == Trajectory(**{**trajectories[0].__dict__, "columns": expected_columns})
    assert second.trajectory == trajectories[1]  # policy_version beyond int32 survives
    assert (first.reward, first.member_scores, first.step) == (0.75, {"rm-a": 0.5, "rm-b": 1.0}, 12)
    assert (second.reward, second.member_scores, second.step) == (-1.5, {"rm-a": -1.0, "rm-b": -2.0}, 12)
    assert (plain.reward, plain.member_scores, plain.step) == (None, {}, None)
    assert plain.trajectory.prompt_id == "arith-7"


def test_file_is_plain_delimited_protobuf(tmp_path):
    path = tmp_path / "one.pb"
    written = write_trajectories(path, make_trajectories()[1:], rewards=[0.0])
    data = path.read_bytes()
    assert written == len(data)
    stream = io.BytesIO(data)
    size = read_varint(stream)
    message = trajectory_pb2.Trajectory.FromString(stream.read(size))
    assert stream.read() == b""
    assert message.prompt_id == "list-1" and message.HasField("reward") and message.reward == 0.0
    assert not message.HasField("step")


def test_truncated_and_corrupt_files_name_the_offset(tmp_path):
    path = tmp_path / "cut.pb"
    write_trajectories(path, make_trajectories())
    data = path.read_bytes()
    first_size = read_varint(io.BytesIO(data))
    second_offset = len(encode_varint(first_size)) + first_size
    path.write_bytes(data[:-3])
    records = read_trajectories(path)
    assert next(records).trajectory.prompt_id == "arith-7"  # intact records still read
    with pytest.raises(ValueError, match=rf"cut\.pb: truncated record at byte {second_offset}"):
        next(records)
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x03\xff\xff\xff")
    with pytest.raises(ValueError, match=r"garbage\.pb: corrupt record at byte 0"):
        list(read_trajectories(garbage))


def test_bad_inputs_leave_the_file_untouched(tmp_path):
    path = tmp_path / "bad.pb"
    bad = make_trajectories()
    bad[1].columns = {"blob": b"\x00"}
    with pytest.raises(ValueError, match=r"trajectory 'list-1' columns 'blob': a bytes cannot be sent"):
        write_trajectories(path, bad)
    assert not path.exists()
    with pytest.raises(ValueError, match="1 rewards for 2 trajectories"):
        write_trajectories(path, make_trajectories(), rewards=[1.0])
    with pytest.raises(ValueError, match="member 'rm' has 3 scores for 2 trajectories"):
        write_trajectories(path, make_trajectories(), member_scores={"rm": [1.0, 2.0, 3.0]})


def test_trim_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_tail(tmp_path):
    from services.rpc.trajectory_io import trim_trajectories

    path = tmp_path / "rollouts.pb"
    for step in (1, 2, 3, 4):
        write_trajectories(path, make_trajectories(), rewards=[step, -step], step=step)
    with open(path, "ab") as f:  # the process died in the middle of an append
        f.write(encode_varint(500) + b"\x0a\x03abc")
    assert trim_trajectories(path, 2) == 4
    records = list(read_trajectories(path))
    assert [(r.step, r.reward) for r in records] == [(1, 1.0), (1, -1.0), (2, 2.0), (2, -2.0)]
    assert records[2].trajectory.columns["task"] == "arithmetic"
    assert trim_trajectories(tmp_path / "missing.pb", 2) == 0


def test_an_episode_keeps_every_turn_with_its_role_and_mask(tmp_path):
    import dataclasses

    plain = make_trajectories()[0]
    episode = dataclasses.replace(
        plain, response_ids=[5, 6, 60, 61, 7], logprobs=[-0.5, -0.25, -0.125], loss_mask=[1, 1, 0, 0, 1],
        turns=[("policy", 0, 2), ("environment", 2, 4), ("policy", 4, 5)], env_reward=0.75,
        env_info={"turns": 2.0})
    write_trajectories(tmp_path / "r.pb", [episode, plain], [1.0, 0.5], step=3)
    got_episode, got_plain = [r.trajectory for r in read_trajectories(tmp_path / "r.pb")]
    assert got_episode == episode  # env_info too: a checkpoint's pending batches keep their episode metrics
    assert got_plain.env_info == {}
    assert got_plain.loss_mask is None and got_plain.turns is None and got_plain.env_reward == 0.0


def test_version_spans_of_a_continued_response_round_trip(tmp_path):
    from services.core.batch_types import Trajectory
    from services.rpc.trajectory_io import read_trajectories, write_trajectories

    t = Trajectory(prompt_id="p", prompt="q", prompt_ids=[1], response="a b c", response_ids=[5, 6, 7],
                   logprobs=[-0.1, -0.2, -0.3], finish_reason="stop", policy_version=2, version_spans=[(0, 2), (2, 4)])
    plain = Trajectory(prompt_id="p", prompt="q", prompt_ids=[1], response="a", response_ids=[5], logprobs=[-0.1],
                       finish_reason="stop", policy_version=2)
    write_trajectories(tmp_path / "r.pb", [t, plain])
    back = [r.trajectory for r in read_trajectories(tmp_path / "r.pb")]
    assert back[0].version_spans == [(0, 2), (2, 4)] and back[1].version_spans is None

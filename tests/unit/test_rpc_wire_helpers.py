"""Pure helpers of the gRPC reward path: columns <-> protobuf Struct, the retry backoff
schedule, request building and its size, loopback detection and address formatting."""

from __future__ import annotations

import random
import socket

import pytest
from google.protobuf import struct_pb2

from services.reward.grpc_client import RewardClient, backoff_delay
from services.reward.grpc_server import format_address, is_loopback
from services.rpc.struct_columns import columns_to_structs, dict_to_struct, struct_to_dict, structs_to_columns

# --- columns <-> Struct ------------------------------------------------------------------------


def test_columns_round_trip_through_structs():
    columns = {
        "answer": ["19", "4", None],
        "weight": [1, 2.5, -3],
        "ok": [True, False, True],
        "tags": [["a", "b"], [], [1, None]],
        "meta": [{"k": "v", "n": {"deep": 1}}, {}, {"x": [True]}],
    }
    structs = columns_to_structs(columns, 3)
    assert len(structs) == 3 and all(isinstance(s, struct_pb2.Struct) for s in structs)
    wire = [struct_pb2.Struct.FromString(s.SerializeToString()) for s in structs]  # over the wire
    back = structs_to_columns(wire)
    assert list(back) == sorted(columns)  # a Struct is a map: keys come back sorted
    assert back["answer"] == ["19", "4", None]
    assert back["weight"] == [1.0, 2.5, -3.0] and all(isinstance(w, float) for w in back["weight"])
    assert back["ok"] == [True, False, True] and all(isinstance(b, bool) for b in back["ok"])
    assert back["tags"] == [["a", "b"], [], [1.0, None]]
    assert back["meta"] == [{"k": "v", "n": {"deep": 1.0}}, {}, {"x": [True]}]


def test_missing_keys_become_none():
    first, second, third = dict_to_struct({"a": "x"}), dict_to_struct({"b": 2}), dict_to_struct({"a": "z", "c": None})
    assert structs_to_columns([first, second, third]) == {"a": ["x", None, "z"], "b": [None, 2.0, None], "c": [None] * 3}
    assert structs_to_columns([struct_pb2.Struct(), struct_pb2.Struct()]) == {}
    assert structs_to_columns([]) == {}
    assert columns_to_structs(None, 2) == [struct_pb2.Struct(), struct_pb2.Struct()]


@pytest.mark.parametrize(
    "columns, pattern",
    [
        ({"blob": [b"raw", b"x"]}, r"column 'blob': a bytes cannot be sent in a protobuf Struct"),
        ({"when": [object(), 1]}, r"column 'when': a object cannot be sent"),
        ({"score": [float("nan"), 1.0]}, r"column 'score': nan is not a finite number"),
        ({"big": [2**60, 1]}, r"column 'big': integer 1152921504606846976 does not fit a float64 exactly"),
        ({"nested": [{"k": {1, 2}}, {}]}, r"column 'nested'.k: a set cannot be sent"),
        ({"keys": [{1: "a"}, {}]}, r"column 'keys': dict key 1 is a int, not a str"),
        ({"short": ["a"]}, r"column 'short' has 1 values for 2 samples"),
        ({"text": "ab"}, r"column 'text': expected a list with one value per sample, got str"),
    ],
)
def test_unsendable_columns_name_the_column(columns, pattern):
    with pytest.raises(ValueError, match=pattern):
        columns_to_structs(columns, 2)


def test_struct_to_dict_of_empty_value_is_none():
    struct = struct_pb2.Struct()
    struct.fields["unset"].CopyFrom(struct_pb2.Value())  # no kind set at all
    assert struct_to_dict(struct) == {"unset": None}


# --- backoff -----------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_caps():
    rng = random.Random(0)
    for retry in range(8):
        ceiling = min(2.0, 0.1 * 2**retry)
        delays = [backoff_delay(retry, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), retry
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not a constant
    assert backoff_delay(30, rng=rng) <= 2.0  # capped even for large retry numbers
    assert backoff_delay(2, base_s=1.0, cap_s=100.0, rng=random.Random(1)) == backoff_delay(
        2, base_s=1.0, cap_s=100.0, rng=random.Random(1)
    )


def test_client_sleeps_by_the_schedule_between_attempts():
    """Nothing listens on the address (a port just freed on loopback): every attempt is
    UNAVAILABLE; the client sleeps once between consecutive attempts, with growing delays."""
    from services.reward.grpc_client import RemoteRewardError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slept: list[float] = []
    client = RewardClient(f"127.0.0.1:{port}", timeout_s=5, retries=5, backoff_base_s=0.1, sleep=slept.append)
    with pytest.raises(RemoteRewardError, match="after 6 attempts"):
        client.health()
    assert client.last_attempts == 6 and len(slept) == 5
    assert all(min(2.0, 0.1 * 2**i) / 2 <= d <= min(2.0, 0.1 * 2**i) for i, d in enumerate(slept))


# --- requests and addresses --------------------------------------------------------------------


def test_build_request_carries_samples_ids_and_metadata():
    request = RewardClient.build_request(
        ["p1", "p2"], ["c1", "c2"], {"answer": ["a", None]}, prompt_token_ids=[[1, 2], [3]],
        completion_token_ids=[[4], []], request_id="r-1",
    )
    assert request.request_id == "r-1"
    assert [(s.prompt, s.completion) for s in request.samples] == [("p1", "c1"), ("p2", "c2")]
    assert [list(s.prompt_token_ids) for s in request.samples] == [[1, 2], [3]]
    assert [list(s.completion_token_ids) for s in request.samples] == [[4], []]
    assert structs_to_columns([s.metadata for s in request.samples]) == {"answer": ["a", None]}
    small = RewardClient.build_request(["p"], ["c"]).ByteSize()
    big = RewardClient.build_request(["p"], ["c" * 10_000]).ByteSize()
    assert big - small >= 10_000  # ByteSize counts the payload the size check compares
    assert RewardClient.build_request(["p"], ["c"]).request_id  # a fresh id when none given
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RewardClient.build_request(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="completion_token_ids has 1 rows for 2 samples"):
        RewardClient.build_request(["a", "b"], ["c", "d"], completion_token_ids=[[1]])


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("localhost", True), ("LOCALHOST", True), ("::1", True), ("[::1]", True),
     ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("rm.internal", False)],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_format_address_brackets_ipv6():
    assert format_address("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert format_address("::1", 8) == "[::1]:8"
    assert format_address("[::]", 9) == "[::]:9"

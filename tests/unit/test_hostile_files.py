"""Hostile inputs, issue #22: files that are damaged or not what they claim to be. A truncated
safetensors file in a model directory, a truncated or missing file of a checkpoint (``--resume``
falls back past it, ``checkpoint.resume_from`` and ``export`` name it), a remote scorer whose
address answers HTTP, a tokenizer with neither a pad nor an eos token. Each fails before Ray
starts, with exit 2 and the file named, and changes nothing (helpers: tests/hostile.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from services.core.errors import UserError
from services.driver.checkpoint import CheckpointStore, model_fingerprint
from tests.hostile import (  # noqa: F401 (good_run, good_sft: fixtures)
    assert_user_error, flywheel, good_run, good_sft, make_checkpoint, snapshot, train_fails,
)


# --- 14. damaged files: a truncated model or checkpoint -------------------------------------------


def cut_model(tmp_path: Path, tiny_model_dir: Path, keep: int | None = None) -> tuple[Path, Path, int]:
    """A copy of the tiny model whose model.safetensors is cut to ``keep`` bytes (default: half);
    (the copy, its model.safetensors, the whole file's size). The shared fixture stays whole."""
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "cut-model")
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as file:
        file.truncate(size // 2 if keep is None else keep)
    return model, weights, size


@pytest.mark.parametrize("command, preset", [
    ("train", "grpo-toy"), ("sft", "sft-toy"), ("train-rm", "rm-toy"), ("eval-rm", "rm-toy"),
])
def test_truncated_model_safetensors_is_named_before_out_is_written(tmp_path, tiny_model_dir, command, preset):
    """It was a SafetensorError traceback ("incomplete metadata, file not fully covered") from
    transformers, or from the vLLM and DeepSpeed actors after Ray started."""
    model, weights, size = cut_model(tmp_path, tiny_model_dir)
    before, out = snapshot(model), tmp_path / "out"
    assert_user_error(flywheel(command, preset, "--out", str(out), f"model.path={model}"),
                      f"model.path: {weights} is damaged (truncated: {size // 2} of {size} bytes)",
                      "copy or download the model again")
    assert snapshot(model) == before and not out.exists()


def test_truncated_reward_model_is_named(good_run, tmp_path, tiny_model_dir):
    model, weights, size = cut_model(tmp_path, tiny_model_dir)
    train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", f"reward.scorers=[{{kind: hf, path: {model}}}]",
                "--resume", expected=[f"reward.scorers.0.path: {weights} is damaged (truncated: {size // 2} of {size} "
                                      "bytes)"])


def test_safetensors_damage_found_from_the_header(tmp_path, tiny_model_dir):
    from services.core.model_files import check_model_files, safetensors_problem

    model, weights, size = cut_model(tmp_path, tiny_model_dir, keep=40)
    assert safetensors_problem(weights).startswith("truncated: 40 of at least ")  # cut inside the JSON header
    assert safetensors_problem(tiny_model_dir / "model.safetensors") is None
    with weights.open("wb") as file:
        file.write((tiny_model_dir / "model.safetensors").read_bytes() + b"\0\0")
    assert safetensors_problem(weights) == f"2 bytes longer than its header says ({size + 2} instead of {size} bytes)"
    weights.write_bytes(b"\x05\x00")
    assert safetensors_problem(weights) == "truncated: 2 bytes, fewer than the 8 that give the header's length"
    weights.write_bytes(b"<html>404 Not Found</html>")  # a download that saved an error page
    assert safetensors_problem(weights).startswith("not a safetensors file")
    weights.unlink()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-1.safetensors"}}))
    with pytest.raises(UserError, match=rf"model\.path: {index} names the shard model-1\.safetensors, which is missing"):
        check_model_files(model, "model.path")
    check_model_files(tmp_path / "no-such-dir", "model.path")  # the callers say what a missing directory means
    check_model_files("org/hub-model", "model.path")


def learner_files(step: int, size: int = 4096) -> dict[str, bytes]:
    """What a DeepSpeed save leaves under learner/policy (no real weights), by path in the checkpoint."""
    return {"learner/policy/latest": f"global_step{step}".encode(),
            f"learner/policy/global_step{step}/mp_rank_00_model_states.pt": b"\x80" * size}


def damage(checkpoint: Path, step: int, keep: int = 1000) -> Path:
    weights = checkpoint / f"learner/policy/global_step{step}/mp_rank_00_model_states.pt"
    with weights.open("r+b") as file:
        file.truncate(keep)
    return weights


def test_resume_falls_back_past_a_damaged_latest_checkpoint(good_run, tiny_model_dir, capsys):
    """`--resume` (and checkpoint.resume_from naming a checkpoints folder) takes the newest intact
    checkpoint, warning with the damaged file; the run itself would start Ray, so this is the
    function `flywheel train` calls first."""
    from services.driver.checkpoint import resolve_resume

    root = good_run / "checkpoints"
    intact = make_checkpoint(root, 4, model_fingerprint(tiny_model_dir), files=learner_files(4))
    latest = make_checkpoint(root, 6, model_fingerprint(tiny_model_dir), files=learner_files(6))
    weights = damage(latest, 6)
    for resume_from, resume in ((None, True), (str(root), False)):
        assert resolve_resume(resume_from, resume, good_run) == intact
        assert capsys.readouterr().err == (f"warning: checkpoint: {weights} is damaged (truncated: 1000 of 4096 "
                                           f"bytes); using {intact} instead, the newest intact checkpoint\n")
    (intact / "learner" / "policy" / "latest").unlink()
    assert resolve_resume(None, True, good_run) == root / "step-000002"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2  # step 6's file, then step 4's
    assert f"{intact / 'learner/policy/latest'} is missing (the checkpoint recorded 12 bytes)" in warnings[1]


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_previous_intact_one(good_run, tiny_model_dir):
    latest = make_checkpoint(good_run / "checkpoints", 4, model_fingerprint(tiny_model_dir), files=learner_files(4))
    weights = damage(latest, 4)
    proc = train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", f"checkpoint.resume_from={latest}",
                       expected=[f"checkpoint.resume_from: {weights} is damaged (truncated: 1000 of 4096 bytes); "
                                 f"{good_run / 'checkpoints' / 'step-000002'} is the previous intact checkpoint"])
    assert "resumed from" not in proc.stdout


def test_resume_with_no_intact_checkpoint_names_the_file(good_run, tiny_model_dir):
    (only,) = CheckpointStore(good_run / "checkpoints").complete()
    config = only / "config.yaml"
    config.write_text("algor")  # written after the manifest: 5 of 24 bytes
    train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", "--resume", expected=[
        f"checkpoint: {config} is damaged (truncated: 5 of 24 bytes); no checkpoint under {good_run / 'checkpoints'} "
        "is intact"])
    train_fails(good_run, "grpo-toy", f"model.path={tiny_model_dir}", f"checkpoint.resume_from={only}", expected=[
        f"checkpoint.resume_from: {config} is damaged (truncated: 5 of 24 bytes); no earlier checkpoint beside it "
        "is intact"])


def test_export_of_a_damaged_checkpoint_names_the_file(good_run, tmp_path, tiny_model_dir):
    latest = make_checkpoint(good_run / "checkpoints", 4, model_fingerprint(tiny_model_dir), files=learner_files(4))
    weights, target = damage(latest, 4), tmp_path / "exported"
    before = snapshot(good_run)
    assert_user_error(flywheel("export", str(latest), str(target)),
                      f"export: {weights} is damaged (truncated: 1000 of 4096 bytes); "
                      f"{good_run / 'checkpoints' / 'step-000002'} is the previous intact checkpoint")
    # OUT/checkpoints: the newest intact one is taken (step 2 of good_run holds no DeepSpeed files)
    proc = flywheel("export", str(good_run / "checkpoints"), str(target))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"warning: checkpoint: {weights} is damaged (truncated: 1000 of 4096 bytes); "
                                  f"using {good_run / 'checkpoints' / 'step-000002'} instead"), proc.stderr
    assert "error: export: " in proc.stderr and "step-000002' holds no DeepSpeed policy checkpoint" in proc.stderr
    assert snapshot(good_run) == before and not target.exists()


# --- 15. remote scorer on an HTTP port; a tokenizer with no pad or eos ---------------------------


def serve_in_thread(server) -> None:
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()


def test_remote_scorer_on_an_http_port_fails_at_once_naming_the_setting():
    """Issue #22: a remote scorer pointed at a web server (a Prometheus exporter, `python -m
    http.server`) retried UNAVAILABLE ("Failed parsing HTTP/2") and said only that. A port that
    answers HTTP is not retried; the actor's error names the scorer and its address setting."""
    import http.server

    from services.core.config import ScorerConfig
    from services.reward.ensemble import ScorerActor
    from services.reward.scorers import ScorerError

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"# HELP up 1\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    serve_in_thread(server)
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        actor = ScorerActor(ScorerConfig(kind="remote", address=address, name="far-rm"), 0)
        with pytest.raises(ScorerError) as info:
            actor.score(["12+7="], ["19"])
    finally:
        server.shutdown()
        server.server_close()
    assert str(info.value) == (
        f"reward scorer 'far-rm' (reward.scorers.0): {address} answered HTTP (\"HTTP/1.0 200 OK\" to GET /), not "
        "gRPC; is reward.scorers.0.address the port of `flywheel serve-reward`?"
    )
    assert actor.scorer.client.last_attempts == 1  # not retried (the default is 4 retries)


def test_a_port_that_answers_another_protocol_fails_at_once_and_a_closed_port_is_retried():
    import socketserver

    from services.reward.grpc_client import NotGrpcServerError, RemoteRewardError, RewardClient

    class Banner(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Banner)
    serve_in_thread(server)
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        client = RewardClient(address, timeout_s=10, retries=3, sleep=lambda s: None)
        with pytest.raises(NotGrpcServerError, match=rf"^{address} answered with something that is not gRPC "
                                                     r"\(HTTP/2\): .*Failed parsing HTTP/2"):
            client.health()
    finally:
        server.shutdown()
        server.server_close()
    assert client.last_attempts == 1
    with socket.socket() as s:  # nothing listens: a server still starting, retried as before
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    client = RewardClient(closed, timeout_s=10, retries=2, sleep=lambda s: None)
    with pytest.raises(RemoteRewardError, match="is unavailable: Health failed after 3 attempts") as info:
        client.health()
    assert not isinstance(info.value, NotGrpcServerError) and client.last_attempts == 3


def without_special_tokens(model_dir: Path, target: Path, *tokens: str) -> Path:
    """A copy of ``model_dir`` whose tokenizer files name none of ``tokens`` (e.g. pad_token)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, target)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (target / name).is_file():
            config = json.loads((target / name).read_text())
            (target / name).write_text(json.dumps({k: v for k, v in config.items() if k not in tokens}))
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert all(getattr(tokenizer, token) is None for token in tokens)
    return target


@pytest.fixture
def no_pad_nor_eos(tiny_model_dir, tmp_path) -> Path:
    return without_special_tokens(tiny_model_dir, tmp_path / "no-pad-nor-eos", "pad_token", "eos_token")


@pytest.mark.parametrize("command, preset", [("train", "grpo-toy"), ("sft", "sft-toy"), ("train-rm", "rm-toy")])
def test_a_tokenizer_with_neither_pad_nor_eos_is_refused_before_anything_starts(no_pad_nor_eos, good_sft, command,
                                                                                 preset):
    """Issue #22: `flywheel train` failed in a DeepSpeed rank (``full(): fill_value`` None),
    `flywheel sft` in the toy evaluation's padding (ValueError), each with a traceback."""
    before, tokenizer_files = snapshot(good_sft), snapshot(no_pad_nor_eos)
    proc = flywheel(command, preset, "--out", str(good_sft), "--overwrite", f"model.path={no_pad_nor_eos}")
    assert_user_error(proc, f"model.path: the tokenizer in {no_pad_nor_eos} has neither a pad token nor an eos "
                            f"token; set one (pad_token or eos_token in {no_pad_nor_eos / 'tokenizer_config.json'})")
    assert snapshot(good_sft) == before and snapshot(no_pad_nor_eos) == tokenizer_files


def test_a_tokenizer_with_no_pad_token_pads_with_its_eos_token(tiny_model_dir, tmp_path):
    from services.core.special_tokens import load_padding_tokenizer, pad_token_id

    no_pad = without_special_tokens(tiny_model_dir, tmp_path / "no-pad", "pad_token")
    tokenizer = load_padding_tokenizer(no_pad, "model.path")
    assert (tokenizer.pad_token, pad_token_id(tokenizer)) == ("<|eos|>", tokenizer.eos_token_id)


def test_sft_without_a_chat_template_refuses_a_tokenizer_with_no_eos(tiny_model_dir, tmp_path):
    """SFT ends each response with the eos token (no chat template); a pad token alone was a
    TypeError in the collation."""
    no_eos = without_special_tokens(tiny_model_dir, tmp_path / "no-eos", "eos_token")
    out = tmp_path / "out"
    assert_user_error(flywheel("sft", "sft-toy", "--out", str(out), f"model.path={no_eos}"),
                      f"model.path: the tokenizer in {no_eos} has no eos token, which ends each SFT response")
    assert not out.exists()

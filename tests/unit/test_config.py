"""Config tree, YAML loading, dotted overrides and the error messages users see."""

from __future__ import annotations

import re
import textwrap

import pytest
from pydantic import ValidationError

from services.core.config import FlywheelConfig, ToyModelConfig
from services.core.config_loading import dump_config, load_config, parse_override, preset_names
from services.core.errors import UserError
from services.core.registry import ALGORITHMS
from services.driver.preflight import check_rl_settings


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = FlywheelConfig()
    assert cfg.model.toy.hidden_size // cfg.model.toy.num_heads == 64
    assert cfg.algorithm.name == "sft"
    path = write(tmp_path, dump_config(cfg))
    assert load_config(str(path)) == cfg


def test_every_preset_loads():
    assert "sft-toy" in preset_names()
    for name in preset_names():
        load_config(name)


def test_sft_toy_preset_by_name():
    cfg = load_config("sft-toy")
    assert cfg.data.source == "toy"
    assert cfg.learner.zero_stage == 0
    assert cfg.learner.lr == pytest.approx(3e-3)
    assert cfg.data.toy_tasks == ["preference", "arithmetic"]
    assert "zero_stage: 0" in dump_config(cfg)


def test_dotted_overrides():
    cfg = load_config(
        "sft-toy",
        [
            "algorithm.kl_coef=0.01",  # float
            "learner.epochs=5",  # int
            "learner.critic=true",  # bool
            "data.toy_tasks=[arithmetic]",  # list
            "model.toy.num_layers=3",  # nested section
            "reward.scorers.0.kind=python",  # list index into a default the preset leaves out
            "reward.scorers.0.path=my_reward.py:score",
            "cluster.address=null",
            "data.source=my data.jsonl",  # '=' split only once, spaces kept
        ],
    )
    assert cfg.algorithm.kl_coef == pytest.approx(0.01)
    assert cfg.learner.epochs == 5 and isinstance(cfg.learner.epochs, int)
    assert cfg.learner.critic is True
    assert cfg.data.toy_tasks == ["arithmetic"]
    assert cfg.model.toy.num_layers == 3
    assert cfg.model.toy.hidden_size == 128  # siblings from the YAML survive
    assert cfg.reward.scorers[0].kind == "python"
    assert cfg.reward.scorers[0].path == "my_reward.py:score"
    assert cfg.cluster.address is None
    assert cfg.data.source == "my data.jsonl"


def test_override_list_index_in_yaml_list(tmp_path):
    path = write(
        tmp_path,
        """
        reward:
          scorers:
            - kind: toy_gold
            - kind: hf
              path: rm/
        """,
    )
    cfg = load_config(str(path), ["reward.scorers.1.kind=python", "data.toy_tasks.0=arithmetic"])
    assert [s.kind for s in cfg.reward.scorers] == ["toy_gold", "python"]
    assert cfg.data.toy_tasks == ["arithmetic", "arithmetic"]
    assert "not an index of a 2-item list" in load_error(str(path), ["reward.scorers.2.kind=hf"])
    assert "not an index" in load_error(str(path), ["reward.scorers.x.kind=hf"])


def test_parse_override():
    assert parse_override("algorithm.kl_coef=0.05") == ("algorithm.kl_coef", 0.05)
    assert parse_override("learner.zero_stage=2") == ("learner.zero_stage", 2)
    assert parse_override("data.source=") == ("data.source", "")
    with pytest.raises(UserError, match="must look like section.key=value"):
        parse_override("learner.lr")
    with pytest.raises(UserError, match="empty key"):
        parse_override("learner..lr=1")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_override("data.toy_tasks=[a")


def test_override_without_equals_rejected():
    assert "'learner.lr' must look like section.key=value" in load_error("sft-toy", ["learner.lr"])


def test_override_into_a_scalar_rejected():
    assert "'learner.lr' is not a section" in load_error("sft-toy", ["learner.lr.x=1"])
    assert "'data.toy_tasks.0' is not a section" in load_error("sft-toy", ["data.toy_tasks.0.x=1"])


def test_override_errors_name_the_override():
    msg = load_error("sft-toy", ["learner.zero_stage=5", "learner.lr_rate=1"])
    assert "2 error(s)" in msg
    assert "override 'learner.zero_stage=5': learner.zero_stage:" in msg
    assert "override 'learner.lr_rate=1': learner.lr_rate: unknown key" in msg


def test_unknown_key_top_level(tmp_path):
    path = write(
        tmp_path,
        """
        seed: 1
        learnr:
          lr: 0.1
        """,
    )
    assert f"{path}:2: learnr: unknown key" in load_error(str(path))


def test_unknown_key_nested(tmp_path):
    path = write(
        tmp_path,
        """
        learner:
          lr: 0.1
          lr_rate: 0.2
        model:
          toy:
            num_layer: 3
        """,
    )
    msg = load_error(str(path))
    assert f"{path}:3: learner.lr_rate: unknown key" in msg
    assert f"{path}:6: model.toy.num_layer: unknown key" in msg


def test_type_error_names_file_line_and_field(tmp_path):
    path = write(
        tmp_path,
        """
        # comment line
        learner:
          epochs: 2
          lr: fast
        """,
    )
    msg = load_error(str(path))
    assert re.search(rf"{re.escape(str(path))}:4: learner\.lr: .*valid number.*\(got 'fast'\)", msg)


def test_every_error_is_reported(tmp_path):
    path = write(
        tmp_path,
        """
        seed: -1
        learner:
          lr: fast
          zero_stage: 4
        algorithm:
          name: dpo
        reward:
          scorers:
            - kind: toy_gold
            - kind: magic
        bogus: 1
        """,
    )
    msg = load_error(str(path))
    assert msg.splitlines()[0] == f"{path}: 6 error(s) in config"
    for expected in [
        f"{path}:1: seed:",
        f"{path}:3: learner.lr:",
        f"{path}:4: learner.zero_stage:",
        f"{path}:6: algorithm.name:",
        f"{path}:10: reward.scorers.1.kind:",
        f"{path}:11: bogus: unknown key",
    ]:
        assert expected in msg, (expected, msg)


def test_wrong_section_type(tmp_path):
    path = write(tmp_path, "learner: 3\n")
    assert f"{path}:1: learner: Input should be a valid dictionary" in load_error(str(path))
    path = write(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in load_error(str(path))


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(str(write(tmp_path, "\n"))) == FlywheelConfig()


@pytest.mark.parametrize(
    "text, line",
    [
        ("learner:\n  lr: 0.1\n epochs: 2\n", 3),
        ("seed: 0\nlearner: {lr: 0.1\n", 3),
        ("seed: 0\ndata:\n\tsource: toy\n", 3),
    ],
)
def test_invalid_yaml_names_the_line(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert load_error(str(path)).startswith(f"{path}:{line}: invalid YAML")


def test_unknown_preset_lists_presets():
    msg = load_error("no-such-preset")
    assert "unknown preset 'no-such-preset'" in msg
    assert "sft-toy" in msg


def test_missing_yaml_file(tmp_path):
    assert "config file not found" in load_error(str(tmp_path / "nope.yaml"))


def test_head_dim_must_be_64(tmp_path):
    with pytest.raises(ValidationError, match="head_dim"):
        ToyModelConfig(hidden_size=256, num_heads=2)
    with pytest.raises(ValidationError, match="divisible"):
        ToyModelConfig(hidden_size=130, num_heads=4)
    ToyModelConfig(hidden_size=256, num_heads=4)
    msg = load_error("sft-toy", ["model.toy.num_heads=4"])
    assert "override 'model.toy.num_heads=4': model.toy:" in msg and "head_dim = hidden_size / num_heads = 32" in msg
    path = write(tmp_path, "model:\n  toy:\n    hidden_size: 256\n")
    assert f"{path}:2: model.toy:" in load_error(str(path))


def test_range_checks():
    assert "learner.lr: Input should be greater than 0 (got -1)" in load_error("sft-toy", ["learner.lr=-1"])
    assert "rollout.top_p" in load_error("sft-toy", ["rollout.top_p=1.5"])
    assert "seed must be >= 0" in load_error("sft-toy", ["seed=-3"])


def test_ptx_coef_only_with_policy_gradient_algorithms():
    import pytest
    from pydantic import ValidationError

    from services.core.config import FlywheelConfig

    with pytest.raises(ValidationError, match="ptx_coef"):
        FlywheelConfig.model_validate({"algorithm": {"name": "online_dpo", "ptx_coef": 0.1}})
    assert FlywheelConfig.model_validate({"algorithm": {"name": "grpo", "ptx_coef": 0.1}}).algorithm.ptx_coef == 0.1


@pytest.mark.parametrize("field", [
    "rollout.generate_timeout_s", "rollout.sync_timeout_s", "reward.timeout_s", "reference.timeout_s",
    "learner.step_timeout_s",
])
def test_every_service_call_bound_must_be_positive(field):
    assert f"{field}: Input should be greater than 0 (got 0)" in load_error("grpo-toy", [f"{field}=0"])


@pytest.mark.parametrize("field", ["rollout.max_restarts", "reward.max_restarts", "reference.max_restarts"])
def test_restart_budgets_are_not_negative(field):
    assert f"{field}: Input should be greater than or equal to 0 (got -1)" in load_error("grpo-toy", [f"{field}=-1"])


def test_tis_cap_only_with_policy_gradient_algorithms():
    users = ", ".join(sorted(n for n in ALGORITHMS.names() if "tis_cap" in ALGORITHMS.get(n).settings))
    assert "grpo, gspo, nash_md, ppo" in users and "online_dpo" not in users
    assert f"algorithm.tis_cap: 'online_dpo' does not use tis_cap (a setting of {users})" in load_error(
        "dpo-toy", ["algorithm.tis_cap=2"])
    streaming = load_config("grpo-toy", ["algorithm.max_staleness=4", "algorithm.tis_cap=2"])  # the decoupled objective
    assert (streaming.algorithm.max_staleness, streaming.algorithm.tis_cap) == (4, 2.0)
    assert "algorithm.max_staleness: Input should be less than or equal to 64" in load_error(
        "grpo-toy", ["algorithm.max_staleness=65"])
    assert "algorithm.tis_cap: Input should be greater than 0" in load_error("grpo-toy", ["algorithm.tis_cap=0"])
    cfg = FlywheelConfig.model_validate({"algorithm": {"name": "grpo", "tis_cap": 2.0}})
    assert cfg.algorithm.tis_cap == 2.0


def test_logprob_gap_alarm_defaults_by_dtype():
    cfg = FlywheelConfig()
    assert cfg.rollout.gap_alarm("fp32") == 1e-3 and cfg.rollout.gap_alarm("bf16") == 1.0
    cfg.rollout.logprob_gap_alarm = 0.25
    assert cfg.rollout.gap_alarm("fp32") == cfg.rollout.gap_alarm("bf16") == 0.25
    assert "rollout.logprob_gap_every: Input should be greater than or equal to 0" in load_error(
        "grpo-toy", ["rollout.logprob_gap_every=-1"])


def test_ppo_minibatch_settings():
    from services.driver.preflight import check_rl_settings, optimizer_steps_per_step
    from services.learner.losses import LossSpec

    assert "algorithm.ppo_epochs: 'online_dpo' does not use ppo_epochs" in load_error("dpo-toy", ["algorithm.ppo_epochs=2"])
    assert "algorithm.ppo_minibatch_size: Input should be greater than or equal to 1" in load_error(
        "grpo-toy", ["algorithm.ppo_minibatch_size=0"])
    cfg = load_config("grpo-toy", ["rollout.prompts_per_step=8", "rollout.n_samples=4", "algorithm.ppo_epochs=2",
                                   "algorithm.ppo_minibatch_size=12", "algorithm.total_steps=10"])
    assert optimizer_steps_per_step(cfg) == 2 * 3  # 32 rows in minibatches of 12: 3 per epoch
    spec = LossSpec.from_config(cfg, "ppo")
    assert (spec.algorithm.ppo_epochs, spec.algorithm.ppo_minibatch_size) == (2, 12)
    check_rl_settings(cfg)
    assert optimizer_steps_per_step(load_config("grpo-toy", [])) == 1
    too_small = load_config("grpo-toy", ["rollout.prompts_per_step=2", "rollout.n_samples=2",
                                         "algorithm.ppo_minibatch_size=1", "learner.num_ranks=2"])
    with pytest.raises(UserError, match=r"algorithm\.ppo_minibatch_size: 1 sequences cut a step's 4 .* into 4 minibatches"):
        check_rl_settings(too_small)


def test_a_setting_the_choice_does_not_read_is_an_error_naming_it(tmp_path):
    assert "override 'algorithm.gamma=0.9': algorithm.gamma: 'grpo' does not use gamma (a setting of ppo, reinforce_pp, reinforce_pp_baseline); remove it " \
           "(got 0.9)" in load_error("grpo-toy", ["algorithm.gamma=0.9"])
    assert "algorithm.kl_coef: 'online_dpo' does not use kl_coef" in load_error("grpo-toy", ["algorithm.name=online_dpo"])
    path = write(tmp_path, """\
        reward:
          scorers:
            - {kind: toy_gold, noise_std: 0.3}
        """)
    assert f"{path}:3: reward.scorers.0.noise_std: 'toy_gold' does not use noise_std (a setting of toy_noisy_gold)" \
        in load_error(str(path))
    # the resolved config.yaml lists only what each choice reads, so it loads again, and a run
    # started from it (a Ray job's, a resumed one's) passes the pre-flight checks too
    for preset in ("grpo-toy", "ppo-toy", "dpo-toy", "rm-toy", "ipo-toy", "nash-toy", "grpo-math"):
        cfg = load_config(preset)
        again = load_config(str(write(tmp_path, dump_config(cfg))))
        assert again == cfg, preset
        if cfg.algorithm.name != "sft":
            check_rl_settings(again)
    for name in ALGORITHMS.names():  # every algorithm's published defaults survive the round trip
        if ALGORITHMS.get(name).loss_kind == "ppo" and name != "ppo":
            cfg = FlywheelConfig.model_validate({"algorithm": {"name": name}, "rollout": {"n_samples": 4}})
            again = load_config(str(write(tmp_path, dump_config(cfg))))
            assert again == cfg, name
            check_rl_settings(again)

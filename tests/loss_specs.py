"""LossSpecs for tests, built the one way the driver builds them: from a validated config."""

from __future__ import annotations

from services.core.config import FlywheelConfig
from services.learner.losses import LossSpec

ALGORITHM_OF_KIND = {"ppo": "ppo", "dpo": "online_dpo"}  # ppo reads every policy-gradient setting
LOSS_LEARNER_SETTINGS = ("entropy_coef", "vf_coef")  # the learner.* fields a loss reads


def loss_spec(kind: str = "ppo", **settings) -> LossSpec:
    """``LossSpec.from_config`` of a config whose algorithm has loss family ``kind`` (ppo: the
    ppo algorithm, dpo: online_dpo, otherwise sft) and whose ``algorithm.*`` / ``learner.*``
    (entropy_coef, vf_coef) fields are ``settings``. kl_coef is 0 unless given (the config's
    default is 0.05), so that a spec of a few settings adds no KL term."""
    learner = {key: settings.pop(key) for key in LOSS_LEARNER_SETTINGS if key in settings}
    algorithm = {"name": ALGORITHM_OF_KIND.get(kind, "sft"), **({} if kind == "dpo" else {"kl_coef": 0.0}), **settings}
    cfg = FlywheelConfig.model_validate({"algorithm": algorithm, "learner": learner})
    return LossSpec.from_config(cfg, kind)

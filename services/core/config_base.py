"""The pieces every config section is built from: ``Section`` (unknown keys are errors),
the errors that name a field, the check that a choice (algorithm.name, a scorer's kind) uses
every field set, and ``Resources`` (what one actor asks Ray for)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf / nan: an error


class SettingError(ValueError):
    """A section's error that belongs to one of its fields: ``key`` is the field, so the config
    error names ``section.key`` and its line (pydantic alone would name the section)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class UnusedSetting(SettingError):
    """A field set in a section whose choice (algorithm.name, a scorer's kind) does not use it."""


def check_used(section: Section, choice: str, used: set[str], users: dict[str, list[str]]) -> None:
    """Every field the user set in ``section`` is one that ``choice`` uses (``users``: which
    choices use a field, for the message)."""
    for key in sorted(section.model_fields_set - used):
        who = users.get(key)
        also = f" (a setting of {', '.join(who)})" if who else ""
        raise UnusedSetting(key, f"'{choice}' does not use {key}{also}; remove it")


def used_dump(section: Section, used: set[str]) -> dict:
    """The section as JSON-able values, only the fields its choice uses (a resolved
    config.yaml then loads again)."""
    return {k: v for k, v in section.model_dump(mode="json").items() if k in used}


class Resources(Section):
    """What one actor of a service asks Ray for."""

    num_cpus: float = Field(0.0, ge=0, description="CPUs per actor (fractional is fine on a laptop)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch CPU threads per actor (learner, reference); null: floor(num_cpus) when it is "
        "at least 1, else the node's cores shared among the service's actors (Ray alone gives such an actor one "
        "thread); on a GPU, Ray's setting"
    )

    def ray_options(self) -> dict:
        """Keyword arguments for ``ActorClass.options(...)``."""
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


def _users(fields_by_choice: dict[str, set[str]]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for choice, fields in fields_by_choice.items():
        for key in fields:
            users.setdefault(key, []).append(choice)
    return {k: sorted(v) for k, v in users.items()}

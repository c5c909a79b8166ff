"""Errors the CLI prints without a traceback.

- ``UserError``: a mistake in the user's input (exit status 2);
- ``ServiceFailure``: a service call that failed for good (a dead actor that could not be
  brought back, a call stuck past its timeout with no restart left); exit status 1. The
  message names the service, the actor and the call, and says how to continue;
- ``RunStopped``: a run that stopped early on a signal after saving a checkpoint (its own
  exit status).
"""


class UserError(Exception):
    """A mistake in the user's input (config, data, paths). The message names the culprit."""

    exit_code = 2


class ServiceFailure(RuntimeError):
    """A service call failed for good; the message names the actor and the call."""

    exit_code = 1


class ServiceTimeout(ServiceFailure, TimeoutError):
    """A call into an actor that returned nothing within its configured timeout."""

    def __init__(self, actor: str, call: str, timeout_s: float, setting: str):
        super().__init__(f"{actor}: {call} returned nothing within {timeout_s:g}s ({setting})")
        self.actor, self.call, self.timeout_s, self.setting = actor, call, timeout_s, setting


class ServiceLost(ServiceFailure):
    """An actor died and Ray could not bring it back (restarts used up, or it did not start)."""


class RunStopped(Exception):
    """The run stopped early on a signal, after saving a checkpoint; ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

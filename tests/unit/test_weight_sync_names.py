"""The engine side of every weight sync (``EngineWeightLoader``): tied names come from the live
model, every name a tied parameter has is loaded, and an update that leaves a parameter out
fails naming it. The stand-in model loads like vLLM's ``AutoWeightsLoader`` (returns the
names it loaded); the real engine is exercised by the rollout-pool and sync-invariant tests."""

from __future__ import annotations

import pytest
import torch

from services.rollout.weight_sync import EngineWeightLoader, IncompleteWeightSync, tied_names, with_tied_names


class TiedLM(torch.nn.Module):
    """embed + one layer + a head tied to the embedding (as vLLM re-ties a hub checkpoint)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.layer = torch.nn.Linear(3, 3, bias=False)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.calls = []

    def load_weights(self, weights):
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights:
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        self.calls.append(sorted(loaded))
        return loaded


def test_tied_names_from_the_live_parameters():
    model = TiedLM()
    assert tied_names(model.named_parameters(remove_duplicate=False)) == {
        "embed.weight": ["head.weight"], "head.weight": ["embed.weight"],
    }
    untied = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5))
    assert tied_names(untied.named_parameters(remove_duplicate=False)) == {}


def test_with_tied_names_adds_each_alias_once():
    tied = {"embed.weight": ["head.weight"], "head.weight": ["embed.weight"]}
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    seen: set[str] = set()
    out = list(with_tied_names([("embed.weight", a), ("layer.weight", b)], tied, seen))
    assert [(n, t is a or t is b) for n, t in out] == [("embed.weight", True), ("head.weight", True), ("layer.weight", True)]
    assert out[1][1] is a  # the head gets the embedding's tensor
    # a state dict that already has both names (a transformers state_dict()) is sent once per name
    assert [n for n, _ in with_tied_names([("embed.weight", a), ("head.weight", c)], tied, set())] == [
        "embed.weight", "head.weight"]
    # across calls of one update (the NCCL engine loads one tensor per call) a name goes once
    assert list(with_tied_names([("head.weight", c)], tied, seen)) == []


def test_engine_loader_completes_tied_names_and_checks_every_parameter():
    model = TiedLM()
    loader = EngineWeightLoader(model)
    new_embed, new_layer = torch.randn(5, 3), torch.randn(3, 3)
    loader.begin()
    model.load_weights(iter([("embed.weight", new_embed), ("layer.weight", new_layer)]))  # what vLLM's reload calls
    loader.check()
    assert model.calls == [["embed.weight", "head.weight", "layer.weight"]]
    assert torch.equal(model.head.weight, new_embed) and torch.equal(model.layer.weight, new_layer)

    loader.begin()  # an update without the layer: named, not silently kept
    model.load_weights(iter([("embed.weight", new_embed)]))
    with pytest.raises(IncompleteWeightSync, match=r"1 engine parameter\(s\) at their old values: layer\.weight"):
        loader.check()

    loader.begin()  # one tensor per call (the NCCL engine): checked over the whole update
    model.load_weights([("layer.weight", new_layer)])
    model.load_weights([("embed.weight", new_embed)])
    loader.check()

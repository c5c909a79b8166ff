"""The reference server: at step 0 its log-probs are the learner's; a Ray pool of replicas
returns the same as one server, in request order."""

from __future__ import annotations

import pytest
import torch

from services.core.batch_types import pack_sequences, response_values
from services.core.config import LearnerConfig, ReferenceConfig, Resources
from services.core.errors import UserError
from services.reference.server import ReferencePool, ReferenceServer
from tests.conftest import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = ["list 3 fruits: apple pear fig", "12+7=19"] * 30
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-ref"), texts, vocab_size=320, seed=4,
                           num_layers=1, intermediate_size=128)


@pytest.fixture(scope="module")
def request_ids():
    g = torch.Generator().manual_seed(0)
    prompt_lens, response_lens = [3, 7, 2, 5, 4, 6, 1], [5, 1, 8, 3, 2, 4, 6]
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(2, 256, (n,), generator=g).tolist() for n in response_lens]
    return prompts, responses


@pytest.fixture(scope="module")
def server(model_dir):
    return ReferenceServer(str(model_dir), ReferenceConfig(micro_batch_size=3))


def test_reference_equals_learner_at_step_0(model_dir, server, request_ids):
    from services.learner.policy_learner import PolicyLearner

    prompts, responses = request_ids
    ref = server.logprobs(prompts, responses)
    assert [len(row) for row in ref] == [len(r) for r in responses]
    learner = PolicyLearner(str(model_dir), LearnerConfig(micro_batch_size=4))
    tokens = pack_sequences(prompts, responses, pad_id=1)
    ours = response_values(learner.logprobs(tokens), tokens)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert all(x < 0 for row in ref for x in row)
    assert 'flywheel_requests_total{method="logprobs",replica="0",service="reference"}' in server.metrics_text()


def test_bad_requests(model_dir, server):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        server.logprobs([[5], [6]], [[7]])
    with pytest.raises(ValueError, match="at least one token"):
        server.logprobs([[]], [[7]])
    assert server.logprobs([], []) == []
    with pytest.raises(UserError, match="no model directory"):
        ReferenceServer(str(model_dir / "missing"), ReferenceConfig())


def test_pool_matches_one_server(model_dir, server, request_ids, ray_session):
    prompts, responses = request_ids
    config = ReferenceConfig(replicas=2, micro_batch_size=2, resources=Resources(num_cpus=0))
    with ReferencePool(str(model_dir), config) as pool:
        got = pool.logprobs(prompts, responses)
        want = server.logprobs(prompts, responses)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
        assert pool.logprobs([], []) == []
        text = pool.metrics_text()
        for replica in (0, 1):  # 7 rows over 2 replicas: both got a share
            assert f'flywheel_requests_total{{method="logprobs",replica="{replica}",service="reference"}} 1.0' in text

"""Shared setup: one intra-op thread everywhere, and tiny real classes built in code, never downloaded.

Pinned before torch loads, and through the environment so that subprocesses (the CLI, the app) inherit it: tiny models
gain nothing from threads, and on two busy cores default threading made one test take 292 s instead of 11 s.
"""

import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from fashionchameleon.models.causal_wan import CausalWanTransformer3DModel  # noqa: E402
from fashionchameleon.presets import perturb_  # noqa: E402
from helpers import TINY_TRANSFORMER  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_transformer() -> CausalWanTransformer3DModel:
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**TINY_TRANSFORMER)
    perturb_(model, torch.Generator().manual_seed(1))
    return model.eval()

"""Shared tiny fixtures: real classes at tiny sizes, built in code, never downloaded."""

import pytest
import torch

from fashionchameleon.presets import TINY_TRANSFORMER, perturb_
from fashionchameleon.models.causal_wan import CausalWanTransformer3DModel


@pytest.fixture(scope="session")
def tiny_transformer() -> CausalWanTransformer3DModel:
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**TINY_TRANSFORMER)
    perturb_(model, torch.Generator().manual_seed(1))
    return model.eval()

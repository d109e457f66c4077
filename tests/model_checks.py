"""Checks shared by the model tests (imported by name: pytest puts tests/ on sys.path)."""

import torch

from isoflop.models.conv import DynamicShortConv
from isoflop.models.lm import LanguageModel, build_model


def randomise_generators(module: torch.nn.Module) -> None:
    """Give the dynamic convs' zero-initialised maps real values, as after training, so that the
    dynamic part of every conv takes part in a comparison."""
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, DynamicShortConv):
                (conv.up if conv.kind == "lowrank" else conv.proj.weight).normal_(0.0, 0.3)


def trained_like(cfg, seed: int = 0) -> LanguageModel:
    """The model for cfg, seeded, with its generator maps randomised (randomise_generators)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    randomise_generators(model)
    return model


def parameters_without_gradient(model: torch.nn.Module, vocab_size: int, batch: int = 2) -> list[str]:
    """Names of parameters with no finite, nonzero gradient after two AdamW steps on random tokens.
    Two steps, because at init zero-initialised generator maps (U, head-wise proj) block the
    gradient of the maps before them; the first step moves them."""
    optimiser = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    idx, targets = torch.randint(0, vocab_size, (batch, 16)), torch.randint(0, vocab_size, (batch, 16))
    for _ in range(2):
        optimiser.zero_grad()
        model(idx, targets)[1].backward()
        optimiser.step()
    return [name for name, p in model.named_parameters()
            if p.grad is None or not bool(p.grad.abs().gt(0).any()) or not p.grad.isfinite().all()]

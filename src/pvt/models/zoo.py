"""The model zoo table, measured from the code next to the papers' numbers."""

from __future__ import annotations

import torch

from pvt.models import create_model, list_models, model_card
from pvt.models.complexity import complexity

HEADER = (
    "| model | params (M) | paper params (M) | GMACs @224 | paper GFLOPs | ImageNet top-1 (paper) |",
    "|---|---|---|---|---|---|",
)


def zoo_rows(pattern: str = "*") -> list[tuple[str, float, float, float, float, float]]:
    """(name, params M, paper params M, GMACs at 224, paper GFLOPs, top-1) for every model."""
    rows = []
    for name in list_models(pattern):
        card = model_card(name)
        with torch.device("cpu"):
            c = complexity(create_model(name))
        rows.append((name, c.params_m, card.paper_params_m, c.gmacs, card.paper_gmacs, card.top1))
    return rows


def zoo_table(pattern: str = "*") -> str:
    """Markdown table of the zoo (builds every matching model and counts it: a few seconds)."""
    lines = list(HEADER)
    for name, params, paper_params, gmacs, paper_gmacs, top1 in zoo_rows(pattern):
        lines.append(f"| `{name}` | {params:.3f} | {paper_params:.1f} | {gmacs:.3f} | {paper_gmacs:.1f} | {top1:.1f} |")
    return "\n".join(lines)

"""The calibrated data regime against the statistics measured on real SmolLM2 activations (REAL_STATS).

Issue 3 asks for NLL, entropy, tail mass below 2^-12 and sorted tile occupancy within 20% of the real
regime; the tail's median and the unsorted occupancy are held to it too. The share of entries >= 2^-12 is
not matched (about 30% low) and is checked only for its order of magnitude.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.cce.regimes import REAL_STATS, calibrated_inputs, regime_stats


@pytest.mark.timeout(600)
def test_calibrated_regime_matches_the_real_softmax_statistics_at_the_smollm2_shape():
    stats = regime_stats(*calibrated_inputs(512, 576, 49152, dtype=torch.bfloat16, device="cpu", seed=0))
    for key in ("nll", "entropy", "tail_mass_mean", "tail_mass_median", "tiles_sorted", "tiles_unsorted"):
        assert stats[key] == pytest.approx(REAL_STATS[key], rel=0.2), key
    assert REAL_STATS["share_above"] / 2 < stats["share_above"] < REAL_STATS["share_above"] * 2

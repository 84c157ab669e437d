"""The calibrated data regime against the statistics measured on real SmolLM2 activations (REAL_STATS).

Only the statistics the generator is known to match are held to the 20% of issue 3; the sorted tile
occupancy is not matched yet (docs/benchmarks.md) and is left out on purpose.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.cce.regimes import REAL_STATS, calibrated_inputs, regime_stats


@pytest.mark.timeout(300)
def test_calibrated_regime_matches_the_real_softmax_statistics_at_the_smollm2_shape():
    stats = regime_stats(*calibrated_inputs(512, 576, 49152, dtype=torch.bfloat16, device="cpu", seed=0))
    for key in ("nll", "entropy", "share_above", "tail_mass_mean"):
        assert stats[key] == pytest.approx(REAL_STATS[key], rel=0.2), key
    assert stats["tiles_unsorted"] == pytest.approx(REAL_STATS["tiles_unsorted"], rel=0.2)

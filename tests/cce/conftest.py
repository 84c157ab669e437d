"""Set-up shared by the CCE tests."""

import pytest

from lmforge.cce import gemm_impl


@pytest.fixture(autouse=True)
def fresh_filter_history():
    """Each test starts with no remembered dense fallbacks (gemm_impl.sorted_order_due), so a test's flat
    inputs never decide whether a later test of the same shape sorts."""
    gemm_impl.reset_filter_history()
    yield
    gemm_impl.reset_filter_history()

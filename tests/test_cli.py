"""The ``lmforge`` command's own behaviour (each subcommand's options are tested beside its library)."""

import pytest
import torch.distributed as dist

from lmforge import cli
from tests.conftest import free_loopback_port


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_the_command_destroys_the_process_group_it_ran_under_even_when_it_fails(tmp_path):
    # Under `accelerate launch` / torchrun a command joins the default process group; left alive, Gloo's
    # threads can abort the process at exit after a run that succeeded (seen in CI as SIGABRT).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_loopback_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["sft", "--config", str(tmp_path / "missing.yaml")])
        assert exit_info.value.code == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

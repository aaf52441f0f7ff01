"""The start-up probe of how many cores other processes keep busy (`latentddpm.threads`)."""

import subprocess
import sys

import pytest
import torch

from latentddpm.threads import busy_cores, choose_torch_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")


def test_busy_cores_sees_a_process_that_keeps_a_core_busy():
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        assert busy_cores(0.5) >= 0.7
    finally:
        hog.kill()
        hog.wait()


def test_chosen_threads_are_at_least_one_and_at_most_torchs_default():
    threads, why = choose_torch_threads()
    assert 1 <= threads <= torch.get_num_threads()
    assert "kept busy by other processes" in why

"""Shared test setup: one intra-op thread (the models are tiny; more threads only contend on 2 cores)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

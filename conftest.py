"""Shared pytest fixtures: the good tiny checkpoints that fault, bad-input and security
tests derive their broken copies from."""

from __future__ import annotations

import pytest

from tests.tiny import TINY_LAYOUTS, copy_checkpoint, save_tiny_llama


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """kind -> a good bf16 tiny Llama checkpoint (~60 KB) of each layout in TINY_LAYOUTS.
    Read-only: tests that break one work on a copy from ``derive``."""
    root = tmp_path_factory.mktemp("good")
    return {kind: save_tiny_llama(str(root / kind), **kwargs) for kind, kwargs in TINY_LAYOUTS.items()}


@pytest.fixture()
def derive(good, tmp_path):
    """derive(kind, name) -> a fresh copy of a good checkpoint to break."""

    def make(kind: str, name: str) -> str:
        return copy_checkpoint(good[kind], str(tmp_path / name))

    return make

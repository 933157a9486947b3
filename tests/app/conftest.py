"""Serve the app in-process on a free loopback port, with a small model for fast end-to-end tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pytest
import torch
from torch import nn

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import spa_viz
from app import launch
from app.models import DEFAULT_CHECKPOINT
from app.service import AnalysisService
from app.settings import AppSettings

TINY = "test-vit-tiny (random weights)"


def tiny_model() -> nn.Module:
    """ViT-Ti/16 with random weights and spread-out random gates, so thresholds split the tokens."""
    model = spa_viz.load("vit_tiny_patch16_224", gate_init_bias=0.0)
    generator = torch.Generator().manual_seed(0)
    for block in spa_viz.spa_blocks(model):
        with torch.no_grad():
            block.gate.proj.weight.normal_(0.0, 0.1, generator=generator)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str
    service: AnalysisService
    settings: AppSettings
    demo: gr.Blocks


@contextmanager
def serve(default_model: str | None, allow_dir: Path | None = None, **settings: object) -> Iterator[Served]:
    """The app on a free port (the tiny model registered as an extra choice), closed and its files
    removed afterwards; ``settings`` override :class:`AppSettings` fields."""
    app_settings = AppSettings(
        port=free_port(),
        default_model=default_model,
        allow_dirs=(allow_dir,) if allow_dir else (),
        max_file_size="2mb",
        concurrency=2,
        **settings,
    )
    threads = torch.get_num_threads()  # the app sets torch's threads for the process; restore them after
    demo, service, url = launch(app_settings, extra_models={TINY: tiny_model}, block=False, quiet=True)
    try:
        yield Served(url, service, app_settings, demo)
    finally:
        demo.close()
        service.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def allow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def served(allow_dir: Path) -> Iterator[Served]:
    with serve(TINY, allow_dir) as app:
        yield app


def default_checkpoint_available() -> bool:
    return DEFAULT_CHECKPOINT in spa_viz.available()

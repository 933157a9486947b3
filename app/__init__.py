"""The SPA microscope: a Gradio app on top of spa_viz (``python -m app``; see app/README.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gradio as gr
from torch import nn

from .examples import Examples, build_examples
from .files import AppFiles
from .models import ModelRegistry
from .service import AnalysisService
from .settings import AppSettings, configure_torch
from .ui import CSS, THEME, build_ui

__all__ = ["AnalysisService", "AppSettings", "create_app", "launch"]

_log = logging.getLogger(__name__)


def create_app(
    settings: AppSettings, extra_models: dict[str, Callable[[], nn.Module]] | None = None
) -> tuple[gr.Blocks, AnalysisService]:
    """The Blocks app and its service; ``extra_models`` adds named model factories to the picker.

    The app's own files (panels, reports) go to a fresh bounded folder that gradio serves as a static
    path (no copy into its cache); ``service.close()`` removes it (so does the interpreter's exit).
    The example images are a static path too, so gradio's cache sweep never removes them.
    """
    configure_torch(settings)
    examples: Examples | None
    try:
        examples = build_examples(settings.examples_dir)
    except (ImportError, OSError) as err:  # examples come from optional packages; the app works without
        _log.warning("no example images (%s)", err)
        examples = None
    registry = ModelRegistry(
        settings.torch_device,
        settings.allow_dirs,
        settings.model_cache_size,
        extra_models,
        settings.default_model,
        settings.max_params,
    )
    files = AppFiles(panel_capacity=settings.panel_files, report_capacity=settings.report_files)
    # served in place: gradio would copy them into its cache, and its sweep would remove the example copies
    gr.set_static_paths([files.root, settings.examples_dir])
    service = AnalysisService(settings, registry, examples, files)
    demo = build_ui(service, examples)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    return demo, service


def launch(
    settings: AppSettings,
    *,
    extra_models: dict[str, Callable[[], nn.Module]] | None = None,
    block: bool = True,
    **kwargs: object,
) -> tuple[gr.Blocks, AnalysisService, str]:
    """Build and serve the app; returns it with its local URL (``block=False`` returns at once).

    With ``block`` the app's files are removed when the server stops; otherwise call ``demo.close()``
    and ``service.close()`` when done.
    """
    demo, service = create_app(settings, extra_models)
    allowed = [str(settings.examples_dir)]
    try:
        _, url, _ = demo.launch(
            server_name=settings.host,
            server_port=settings.port,
            share=settings.share,
            max_file_size=settings.max_file_size,
            allowed_paths=allowed,
            prevent_thread_lock=not block,
            theme=THEME,
            css=CSS,
            show_error=True,
            **kwargs,
        )
    except BaseException:
        service.close()
        raise
    if block:  # the server has stopped
        service.close()
    return demo, service, url

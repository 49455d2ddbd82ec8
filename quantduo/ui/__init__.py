"""``quantduo serve``: a local web UI (Gradio) for SVDQuant image generation and DuoAttention long-context Q&A.

    quantduo serve                                    # bundled tiny DiT + tiny LM, on CPU, http://127.0.0.1:7860
    quantduo serve --model flux-int4 --model random-flux --llm /models/Llama-3-8B --pattern llama3-pattern

Layout: :mod:`.app` builds the page, :mod:`.jobs` runs one job at a time (bounded queue, progress, cancel) and
:mod:`.backend` is the only module that calls the rest of quantduo. Needs the ``ui`` extra (gradio).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_PORT = 7860


def serve(args: argparse.Namespace, block: bool = True):
    """Build the app from parsed ``serve`` arguments and launch it; returns the Blocks (``block=False``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        from .app import ServeConfig, build_app
    except ImportError as err:
        raise SystemExit(f"error: quantduo serve needs gradio ({err}); pip install 'quantduo[ui]'") from None
    from .backend import TINY_DIT, PublishedEngine, UserError, engine_class

    for spec in args.model or []:
        if engine_class(spec) is PublishedEngine and args.base is None:
            raise SystemExit(f"error: --model {spec} is a published SVDQuant checkpoint: give --base, the base "
                             "model's local diffusers pipeline folder")
    config = ServeConfig(models=args.model or [TINY_DIT], llm=args.llm, pattern=args.pattern, sparsity=args.sparsity,
                         cache_dir=Path(args.cache_dir), max_waiting=args.max_queue,
                         max_upload_bytes=int(args.max_upload_mb * 2**20), base=args.base)
    try:
        demo, _ = build_app(config)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"quantduo serve: http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=2 * config.max_upload_bytes,
                ssr_mode=False, show_error=True, quiet=True, prevent_thread_lock=not block)
    return demo


def _cmd_serve(args: argparse.Namespace) -> int:
    if (args.llm is None) != (args.pattern is None) and args.pattern is None:
        raise SystemExit("error: --llm needs --pattern (its DuoAttention head pattern directory)")
    serve(args)
    return 0


def register(subparsers) -> None:
    """Add ``quantduo serve`` to the quantduo CLI."""
    p = subparsers.add_parser("serve", help="web UI: SVDQuant images and DuoAttention long-context Q&A (Gradio)")
    p.add_argument("--model", action="append",
                   help="image model, repeatable: a diffusers or `quantduo quantize` folder, a published SVDQuant "
                        "checkpoint (with --base), 'tiny-dit' (the bundled digits DiT, the default) or 'random-flux' "
                        "(full-size FLUX.1-dev, random weights, GPU)")
    p.add_argument("--base", help="the base model's local diffusers pipeline folder, for a --model that is a published "
                                  "SVDQuant checkpoint (Nunchaku .safetensors file or nunchaku_lite folder)")
    p.add_argument("--llm", help="transformers model folder for the long-context tab (default: the bundled tiny LM)")
    p.add_argument("--pattern", help="DuoAttention pattern directory for --llm")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming heads")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "quantduo" / "ui"),
                   help="where the on-the-fly quantized tiny DiT is kept")
    p.add_argument("--max-queue", type=int, default=2, help="requests that may wait behind the running one")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest text upload")
    p.set_defaults(func=_cmd_serve)

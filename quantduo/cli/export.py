"""``quantduo export``: write a quantized FLUX transformer in a published SVDQuant layout.

    quantduo export --layout nunchaku --model QUANT_PIPELINE_DIR --out svdq-int4-flux.safetensors
    quantduo export --layout nunchaku-lite --model svdq-int4_r32-flux.1-dev.safetensors --base FLUX.1-dev/ --out DIR

``--model``: a quantduo pipeline folder (its transformer) or a published checkpoint (any layout; ``--base`` as for
``generate``). What each layout can hold: :mod:`quantduo.integrations.published.export`.
"""
from __future__ import annotations

from quantduo.cli.validate import bad, output_file, output_folder, pipeline_folder
from quantduo.integrations.diffusers import denoiser_of, load_pipeline, quantized_by_quantduo
from quantduo.integrations.published import (EXPORT_LAYOUTS, export_checkpoint, is_published,
                                             load_published_transformer)
from quantduo.utils import DTYPES


def _check_export_args(args) -> None:
    """--model a quantduo-quantized pipeline folder or a published checkpoint, --base a pipeline folder, --out a
    .safetensors file (nunchaku) or a folder (nunchaku-lite), checked before anything loads."""
    if is_published(args.model):
        if args.base is not None:
            pipeline_folder(args.base, "--base")
    else:
        _, config = pipeline_folder(args.model)
        if not quantized_by_quantduo(config):
            raise bad("--model", f"{args.model} is not quantized: give a `quantduo quantize` output folder or a "
                                 f"published SVDQuant checkpoint")
    if args.layout == "nunchaku":
        output_file(args.out, "--out", ".safetensors")
    else:
        output_folder(args.out, "--out", inputs=[args.model])


def cmd_export(args) -> int:
    _check_export_args(args)
    dtype = DTYPES[args.dtype]
    if is_published(args.model):
        model, _ = load_published_transformer(args.model, args.base, dtype)
    else:
        _, model = denoiser_of(load_pipeline(args.model, dtype))
    print(f"wrote {export_checkpoint(model, args.out, args.layout, made_by={'command': args.command_line})}")
    return 0


def register(subparsers) -> None:
    """Add the ``export`` sub-command."""
    e = subparsers.add_parser("export", help="write a quantized FLUX transformer in a published SVDQuant layout")
    e.add_argument("--layout", choices=EXPORT_LAYOUTS, required=True)
    e.add_argument("--model", required=True, help="quantduo pipeline folder or published SVDQuant checkpoint")
    e.add_argument("--base", help="base model's diffusers folder, for a published checkpoint lacking config / tensors")
    e.add_argument("--out", required=True, help="output .safetensors file (nunchaku) or model folder (nunchaku-lite)")
    e.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    e.set_defaults(func=cmd_export)

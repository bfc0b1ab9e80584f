"""Convert a model: a llama.cpp GGUF file into a model directory, or any model into mlx-lm's quantized format.

    python -m sts_edge.convert --gguf model.gguf --out DIR
    python -m sts_edge.convert --model Qwen/Qwen2.5-7B-Instruct --quantize 4 --out qwen-7b-4bit
    python -m sts_edge.convert --gguf model.gguf --quantize 8 --group-size 32 --out DIR

Quantized directories load on both backends (kept packed on an NVIDIA GPU, and by MLX) and in mlx-lm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sts_edge.cli import ExamplesHelpFormatter
from sts_edge.conversion import check_output, convert, quantize_model
from sts_edge.errors import StsEdgeError
from sts_edge.models import resolve_model
from sts_edge.quantization import BITS, GROUP_SIZES, Quantization


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sts_edge.convert", description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n" + __doc__.split("\n\n", 1)[1].rstrip('"'),
                                     formatter_class=ExamplesHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="a GGUF file to import")
    source.add_argument("--model", help="a model directory, an alias or a Hugging Face repo id to quantize (needs --quantize)")
    parser.add_argument("--out", required=True,
                        help="model directory to write: a new or empty directory, or with --force one converted before")
    parser.add_argument("--quantize", type=int, choices=BITS, help="bits per weight, in mlx-lm's affine format")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64, help="weights per scale and bias")
    parser.add_argument("--keep-embeddings", action="store_true",
                        help="keep the embedding table and the LM head in floating point")
    parser.add_argument("--force", action="store_true",
                        help="replace the model files of an earlier conversion at --out (other files there are kept)")
    parser.add_argument("--offline", action="store_true", help="only models already downloaded (as HF_HUB_OFFLINE=1)")
    args = parser.parse_args(argv)
    if args.model and args.quantize is None:
        parser.error("--model converts to the quantized format: give --quantize 4 or 8 (or --gguf to import a GGUF file)")
    try:
        quantization = None if args.quantize is None else Quantization(args.quantize, args.group_size, args.keep_embeddings)
        if args.gguf:
            out = convert(args.gguf, args.out, force=args.force, quantization=quantization)
        else:
            check_output(Path(args.out), args.force)  # before a download
            model_dir = resolve_model(args.model, offline=args.offline or None)
            out = quantize_model(model_dir, args.out, quantization, force=args.force)
    except ImportError:
        print('error: GGUF import needs the gguf package: pip install -e ".[gguf]" (from the sts-edge checkout)',
              file=sys.stderr)
        return 1
    except StsEdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

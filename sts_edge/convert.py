"""Convert a llama.cpp GGUF file into a model directory that sts-edge (and transformers) load.

    python -m sts_edge.convert --gguf model.gguf --out DIR
"""

from __future__ import annotations

import argparse
import sys

from sts_edge.cli import HelpFormatter
from sts_edge.conversion import convert
from sts_edge.errors import StsEdgeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sts_edge.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--gguf", required=True, help="the GGUF file to import")
    parser.add_argument("--out", required=True,
                        help="model directory to write: a new or empty directory, or with --force one converted before")
    parser.add_argument("--force", action="store_true",
                        help="replace the model files of an earlier conversion at --out (other files there are kept)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.gguf, args.out, force=args.force)
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

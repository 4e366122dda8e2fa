#!/usr/bin/env python
"""HF vs megatron logits at a TP/PP layout. Same as `soaes compare-logits ...`."""
import sys

from megatron_soaes.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-logits", *sys.argv[1:]]))

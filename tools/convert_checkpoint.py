#!/usr/bin/env python
"""HF <-> megatron torch_dist conversion. Same as `soaes convert ...`."""
import sys

from megatron_soaes.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

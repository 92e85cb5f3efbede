"""`python -m aepsl` (and `torchrun -m aepsl`) runs the CLI."""

from aepsl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

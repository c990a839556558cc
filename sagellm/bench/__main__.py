"""`python -m sagellm.bench ...`, the same as `sage-llm bench ...`."""

import sys

from sagellm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())

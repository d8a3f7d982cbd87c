"""``python -m bitlm VERB ...`` — the same as the ``bitlm`` command (what torchrun's ``-m bitlm`` runs)."""

import sys

from bitlm.cli import main

if __name__ == "__main__":
    sys.exit(main())

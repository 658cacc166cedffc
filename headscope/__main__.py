"""``python -m headscope ...`` (and ``torchrun -m headscope``): the same CLI as the ``headscope`` script."""
import sys

from headscope.cli import main

sys.exit(main())

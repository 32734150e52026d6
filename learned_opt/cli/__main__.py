"""``python -m learned_opt.cli`` (and ``torchrun ... -m learned_opt.cli``): the ``learned-opt`` command."""
import sys

from . import main

sys.exit(main())

"""``python -m drmm`` = the ``drmm`` command."""

import sys

from .cli import main

sys.exit(main())

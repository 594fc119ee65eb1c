"""``python -m relay.cli`` is the ``relay`` command."""

import sys

from relay.cli.main import main

sys.exit(main())

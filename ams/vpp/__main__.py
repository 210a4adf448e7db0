"""``python -m ams.vpp``: the VPP subcommands until the ``ams`` console script carries them."""

import sys

from ams.vpp.cli import main

sys.exit(main())

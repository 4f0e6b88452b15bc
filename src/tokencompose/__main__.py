"""``python -m tokencompose``: the same CLI as the ``tokencompose`` command."""

import sys

from tokencompose.cli import main

sys.exit(main())

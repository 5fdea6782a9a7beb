"""``python -m tui_client.cli``: the same as the ``blindpost`` command."""

import sys

from tui_client.cli.entry import main

sys.exit(main())

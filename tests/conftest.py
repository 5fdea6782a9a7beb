"""Root test configuration.

Importing e2ee first installs the protobuf shim, so test modules may import
python-axolotl directly (in any import order ruff's isort chooses).
"""

import e2ee  # noqa: F401

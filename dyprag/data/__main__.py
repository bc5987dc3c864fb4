"""``python -m dyprag.data fetch NAME...``: see ``dyprag.data.fetch``."""

import sys

from dyprag.data.fetch import main

sys.exit(main())

"""``python -m n2v_chunked.cli``: the ``n2v-chunked`` command."""

import sys

from .commands import main

sys.exit(main())

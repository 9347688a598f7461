"""`python -m reinitd`: the same as the `reinitd` command."""

import sys

from reinitd.cli import main

sys.exit(main())

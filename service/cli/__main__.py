"""`python -m service.cli`: the `cnnserve` command."""

import sys

from service.cli import main

sys.exit(main())

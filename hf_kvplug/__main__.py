"""`python -m hf_kvplug ...` runs the `hf-kvplug` command."""

import sys

from .cli import main

sys.exit(main())

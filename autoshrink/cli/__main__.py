import sys

from autoshrink.cli import main

sys.exit(main())

import sys

from te_switch.cli import main

sys.exit(main())

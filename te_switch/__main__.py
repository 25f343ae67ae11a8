import sys

from te_switch.standalone.cli import main

sys.exit(main())

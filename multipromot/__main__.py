import sys

from multipromot.cli import main

sys.exit(main())

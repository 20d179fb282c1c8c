import sys

from opendit.cli import main

sys.exit(main())

import sys

from samg.cli import main

sys.exit(main())

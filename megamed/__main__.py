import sys

from megamed.cli import main

sys.exit(main())

import sys

from aqsearch.cli import main

sys.exit(main())

import sys

from multidomain.cli import main

sys.exit(main())

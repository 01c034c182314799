import sys

from opdgeom.cli import main

sys.exit(main())

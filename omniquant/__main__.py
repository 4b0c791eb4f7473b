import sys

from omniquant.cli import main

sys.exit(main())

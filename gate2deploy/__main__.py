import sys

from gate2deploy.cli import main

sys.exit(main())

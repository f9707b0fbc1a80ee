import sys

from worker.engine.cli import main

sys.exit(main())

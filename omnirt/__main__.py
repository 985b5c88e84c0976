import sys

from omnirt.cli import main

sys.exit(main())

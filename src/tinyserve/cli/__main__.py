import sys

from tinyserve.cli import main

sys.exit(main())

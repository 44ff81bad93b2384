import sys

from rgdm.cli import main

sys.exit(main())

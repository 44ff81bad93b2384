import os
import sys

from rgdm.cli import main
from rgdm.distributed import launched_by_torchrun

code = main()
if launched_by_torchrun():
    # A torchrun worker has nothing left to finalise (checkpoints and logs are written and closed),
    # and interpreter finalisation beside gloo's C++ threads can abort a run that succeeded
    # ("terminate called without an active exception"): flush and leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)

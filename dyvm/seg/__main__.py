"""python -m dyvm.seg ...: the same as `python main.py seg ...`."""
import sys

from dyvm.seg.run import main

sys.exit(main())

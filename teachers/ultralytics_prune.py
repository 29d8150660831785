"""Moved to families/ultralytics/prune.py; this alias lets students pickled before the move (best.pt, last.pt) load."""
import sys

import families.ultralytics.prune as _moved

sys.modules[__name__] = _moved

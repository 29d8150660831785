"""Moved to families/ultralytics/blocks.py; this alias lets students pickled before the move (best.pt, last.pt) load."""
import sys

import families.ultralytics.blocks as _moved

sys.modules[__name__] = _moved

"""Makes the flat top-level modules (model.py, data.py, ...) importable from tests/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

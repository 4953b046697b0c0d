"""The DiLoCo workers live beside these tests; ``run_ranks`` comes from tests/conftest.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

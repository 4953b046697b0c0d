"""The framework workers live beside these tests; ``_frameworks`` comes from tests/."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

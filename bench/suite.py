"""The benchmark suite (see fasthug_patch/bench/suite.py):

    python bench/suite.py run --python VENV_5X/bin/python --python VENV_457/bin/python
    python bench/suite.py render
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fasthug_patch.bench.suite import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

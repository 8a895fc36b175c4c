"""Only here to ship fasthug_patch.pth at the top of site-packages (pyproject has no way to).

The .pth line costs one environment lookup at interpreter start, and imports the plugin
only when FASTHUG_ENABLE holds a true word.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "fasthug_patch.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join("fasthug_patch", "startup", PTH_NAME), os.path.join(self.build_lib, PTH_NAME))


setup(cmdclass={"build_py": BuildPyWithPth})

"""Launch helpers behind the ``commhooks-launch`` console script and the files in ``launch/``:
the exact torchrun / horovodrun / mpirun commands, and a bandwidth-shaped local cluster."""

from commhooks.launch.commands import horovodrun, mpirun, torchrun
from commhooks.launch.netns import Link, ShapedCluster

__all__ = ["Link", "ShapedCluster", "horovodrun", "mpirun", "torchrun"]

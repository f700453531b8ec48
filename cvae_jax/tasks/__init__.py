"""Tasks: what a run trains, evaluates and reports, by name (`task=NAME`). base.py holds the protocol and
the registry; density.py (VAE, CVAE, AE on images and signals), molecules.py (conditional molecule
generation; its helpers: moses_metrics.py, chemnet.py and molecule_space.py) and quadrants.py (structured-output
prediction) are the tasks. A new task is a module that calls `register`."""
from cvae_jax.tasks.base import TASKS, Restored, RestoreError, Task, get, register
from cvae_jax.tasks import density, molecules, quadrants  # noqa: F401  (each registers its task)

__all__ = ["TASKS", "Restored", "RestoreError", "Task", "get", "register"]

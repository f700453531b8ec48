"""The one training engine: the compiled epoch (epoch.py), the loop with its checkpoints, metrics, resume,
non-finite guard and early stopping (loop.py), the optimizer (optim.py), Orbax checkpoints
(checkpoints.py) and the self-describing run directory (rundir.py). It trains any task's loss and knows
no task."""

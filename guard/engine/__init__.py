"""The generation engine: a loop that schedules (``loop``), the decision from scores to actions
(``decide``), the running replies and their KV rows (``batch``, ``reply``) and the one route for hidden
states (``tap``)."""

from guard.engine.loop import TORCH_THREADS, Engine, QueueFull, default_threads

__all__ = ["TORCH_THREADS", "Engine", "QueueFull", "default_threads"]

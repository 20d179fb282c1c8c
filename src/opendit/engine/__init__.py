"""The engine: load once, generate many times (`Engine`, `generate`), through one executor per way of running
(executors.py), one replica per rank (replica.py), and the runner the source declares (sampler_runner.py for
OpenDiT's own class-conditional models, pipeline_runner.py for a diffusers pipeline's own loop)."""

from opendit.engine.engine import Engine, generate

__all__ = ["Engine", "generate"]

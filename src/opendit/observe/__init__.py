"""What a run reports about itself: per-phase memory peaks (memory.py) and Chrome traces of steps and collectives
(trace.py)."""

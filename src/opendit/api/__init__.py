"""The request and its surfaces: the fields declared once (request.py), each surface's view of them (surfaces.py),
resolving a request into an engine spec for a checkpoint (generation.py, video.py) or a diffusers folder
(pipelines.py), and the one-shot `generate`."""

"""Files in and out: checkpoints (finding, checking, memory-lean loading), conversion to safetensors, and the images,
videos and records `opendit sample` writes."""

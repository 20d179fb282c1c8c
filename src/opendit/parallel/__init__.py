"""Multi-device runtime: mesh and comm layer, sequence parallel kernels (Ulysses, ring, USP, FastSeq), applied from
outside the model. Import the submodules directly (e.g. `from opendit.distributed.comm import Comm`)."""

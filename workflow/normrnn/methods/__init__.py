"""The methods the papers compare: normalizations (``norms/``, one module per family),
weight quantizers, the recurrent cells and the task models. Nothing here imports a compute
backend but the cells, which hand a layer's call to the chooser in ``compute.paths``."""

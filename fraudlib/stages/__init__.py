"""The pipeline's stages as typed functions: one module per stage.

Each stage module has a frozen ``Params`` dataclass (typed, documented, validated fields),
an ``Outputs`` dataclass (small values and paths, glued by the notebook for the next stage)
and ``run(params) -> Outputs``. Its notebook (``notebooks/NN_<stage>.ipynb``) holds the
parameters cell, one call, then tables and plots for the reader and the glue of the outputs.
The runner reads a stage notebook's ``metadata.fraudlib.stage`` (the module's name) to check
parameters against ``Params`` before anything runs.
"""

STAGE_MODULES = ("fraudlib.stages.preprocess", "fraudlib.stages.train", "fraudlib.stages.evaluate",
                 "fraudlib.stages.deploy")

"""The pipeline's stages, one module per RocketQA step; importing this package registers them in run order."""

from rocketqa_ray.pipeline.stages import (  # noqa: F401  (order = run and report order)
    baselines,
    rerank,
    step1_md0,
    step2_mc,
    step3_md1,
    step4_md2,
)

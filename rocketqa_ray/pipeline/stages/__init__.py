"""The pipeline's stages, one module per RocketQA step; importing this package registers them in run order."""

import importlib

# Run and report order. Imported by name, in this order, because stages register as their module is imported
# and an import sorter would reorder a plain import list alphabetically.
STEP_MODULES = ("baselines", "step1_md0", "step2_mc", "step3_md1", "step4_md2", "rerank")

for _module in STEP_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

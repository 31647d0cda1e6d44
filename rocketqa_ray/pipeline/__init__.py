"""The four RocketQA steps as resumable stages (registry, runner, context, stages/, report)."""

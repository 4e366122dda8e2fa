"""Workflows that chain jobs: the SFT curriculum runner, the pipeline and its report, export for
inference, and the demo."""

"""fscs: weakly-supervised few-shot classification & segmentation harness."""

"""Converters from the standard dataset layouts (PASCAL VOC 2012 + SBD, COCO 2014) into fscs shards."""
from __future__ import annotations

import logging

from fscs.data.sources.coco import convert_coco
from fscs.data.sources.common import ConversionReport
from fscs.data.sources.pascal import convert_pascal

logger = logging.getLogger(__name__)

__all__ = ["ConversionReport", "convert_coco", "convert_pascal"]

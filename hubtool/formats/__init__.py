"""On-disk formats: the table of per-format facts (``table``) and the model repos hubtool exports (``export``)."""

from .table import FORMATS, PACKING_AWQ, PACKING_V1, PACKING_V2, PACKINGS, FormatInfo

__all__ = ["FORMATS", "FormatInfo", "PACKINGS", "PACKING_V1", "PACKING_V2", "PACKING_AWQ"]

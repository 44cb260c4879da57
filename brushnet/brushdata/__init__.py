"""BrushData, the official training-data format: samples (:mod:`.samples`: encode/decode with validation),
shards (:mod:`.shards`: an atomic writer, a scanner giving each member's byte offsets) and the dataset index
built from those offsets (:mod:`.index`).

A shard is an uncompressed tar whose members are ``<key>.<suffix>``, grouped by key, in the official order
(official train_brushnet.py, MyWebDataset, reads these fields through webdataset):

- ``image``: JPEG bytes; ``caption``: UTF-8 text; ``height``/``width``: UTF-8 decimal, the stored JPEG's size;
- ``segmentation``: JSON ``{"mask": [RLE, ...]}``, BrushData RLEs (:func:`brushnet.masks.brushdata_rle_decode`);
- ``json``: our own metadata (JSON object or null), ignored by the official loader.
"""

from brushnet.brushdata.index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    DatasetIndex,
    DatasetIndexError,
    ShardEntry,
    load_index,
    verify_index,
    write_index,
)
from brushnet.brushdata.samples import (
    MEMBER_ORDER,
    REQUIRED_MEMBERS,
    BrushDataError,
    BrushDataSample,
    DecodedSample,
    check_key,
    decode_sample,
    encode_sample,
)
from brushnet.brushdata.shards import SampleRecord, ShardWriter, read_sample, scan_shard

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "MEMBER_ORDER",
    "REQUIRED_MEMBERS",
    "BrushDataError",
    "BrushDataSample",
    "DatasetIndex",
    "DatasetIndexError",
    "DecodedSample",
    "SampleRecord",
    "ShardEntry",
    "ShardWriter",
    "check_key",
    "decode_sample",
    "encode_sample",
    "load_index",
    "read_sample",
    "scan_shard",
    "verify_index",
    "write_index",
]

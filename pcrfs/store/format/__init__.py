"""The on-disk PCR store layout: names, constants and array dtypes.

See docs/format.md for the full specification. Everything here is data about
the format; reading and writing live in index.py, writer.py and reader.py.
"""
from __future__ import annotations

import numpy as np

FORMAT_NAME = "pcr"
# Version 1: a record holds a contiguous range of images in path order.
# Version 2: the writer chooses which images share a record and their order in it (the
# storage order, index/storage_order.npy); everything else is as in version 1.
# A store is written as version 1 when its storage order is the path order, so readers
# of version 1 keep reading it; readers of this version read both.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
RECORD_LAYOUT_VERSION = 1  # the u32 in every record header: the record file layout, the same in both

MANIFEST = "pcr.yaml"
INDEX_DIR = "index"
RECORDS_DIR = "records"
REPORT = "report.json"
PARTIAL_DIR = ".partial"  # present only while a conversion is unfinished

RECORD_SUFFIX = ".pcr"
# Every record file starts with this 16-byte header: magic (8), format version
# (u32 LE), record id (u32 LE). Group regions follow it.
RECORD_MAGIC = b"PCRFSREC"
RECORD_HEADER_SIZE = 16

DEFAULT_RECORD_BYTES = 64 * 1024 * 1024

# Per-image fixed-size fields. Offsets, record ids and labels are derived
# (see index.py), which keeps the index under 100 bytes per image for 10 groups.
IMAGE_DTYPE = np.dtype([
    ("src_size", "<u8"),      # bytes of the source file
    ("src_mtime_ns", "<i8"),  # source mtime, ns since the epoch
    ("n_groups", "u1"),       # scan groups of this image (<= the store's num_groups)
    ("flags", "u1"),          # FLAG_* bits
])
FLAG_REENCODED = 1  # not a lossless transcode: the source was not a (supported) JPEG

RECORD_DTYPE = np.dtype([
    ("first_image", "<u8"),  # storage position of the record's first image (v1: its image number)
    ("n_images", "<u8"),
    ("size", "<u8"),         # bytes of the record file, header included
])

GROUP_LENGTH_DTYPE = np.dtype("<u4")
GROUP_CRC_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")

# index/ files: name -> what it holds
INDEX_FILES = (
    "images.npy",                 # IMAGE_DTYPE[n]
    "group_lengths.npy",          # u4[n, G]  length of each scan group, 0 past n_groups
    "group_crc32.npy",            # u4[n, G]  CRC-32 (zlib) of each scan group
    "records.npy",                # RECORD_DTYPE[R]
    "record_group_offsets.npy",   # u8[R, G]  where group g's region starts in record r
    "paths.bin",                  # UTF-8 relative paths, concatenated ('/'-separated)
    "path_offsets.npy",           # u8[n+1]  path i is paths.bin[o[i]:o[i+1]]
    "dirs.bin",                   # every directory's relative path, concatenated
    "dir_offsets.npy",            # u8[D+1]
    "dir_ranges.npy",             # u8[D, 2]  [first, end) images under directory d
)
STORAGE_ORDER = "storage_order.npy"  # u8[n] (version 2): the image at each storage position
STORAGE_ORDER_DTYPE = np.dtype("<u8")

# the storage orders `pcrfs convert --order` writes
ORDER_SHUFFLED = "shuffled"
ORDER_SOURCE = "source"
ORDERS = (ORDER_SHUFFLED, ORDER_SOURCE)


def index_files(version: int) -> tuple[str, ...]:
    """The index files of a store of format ``version``."""
    return INDEX_FILES + ((STORAGE_ORDER,) if version >= 2 else ())

# Limits every stored name must keep (what Linux allows: NAME_MAX, PATH_MAX), so the
# mount can list and open all of them; readers refuse an index that breaks them.
MAX_NAME_BYTES = 255    # one path component
MAX_PATH_BYTES = 4095   # a whole relative path
MAX_GROUPS = 255        # images.npy n_groups is u1

# Names on disk may not be valid UTF-8; surrogateescape round-trips their bytes.
PATH_ENCODING = "utf-8"
PATH_ERRORS = "surrogateescape"


def record_name(record_id: int) -> str:
    return f"{RECORDS_DIR}/{record_id:05d}{RECORD_SUFFIX}"


def record_header(record_id: int) -> bytes:
    return RECORD_MAGIC + RECORD_LAYOUT_VERSION.to_bytes(4, "little") + record_id.to_bytes(4, "little")


def encode_path(path: str) -> bytes:
    return path.encode(PATH_ENCODING, PATH_ERRORS)


def decode_path(raw: bytes) -> str:
    return raw.decode(PATH_ENCODING, PATH_ERRORS)


def path_sort_key(path: str) -> tuple[str, ...]:
    """Images are stored sorted by path components, so every directory's images
    form one contiguous range of the index."""
    return tuple(path.split("/"))

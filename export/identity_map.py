"""The ``identity_map`` export for warehouses: a Parquet file of (identifier pseudonym ->
unified ID, valid from/to) in one destination's pseudonym domain, written atomically
(temporary file, fsync, rename), so it joins with what that destination received.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from export.domains import DomainRekeyer
from export.sink import fsync_path
from identity.identifiers import Identifier
from identity.identity_map import MapInterval

SCHEMA = pa.schema(
    [
        ("id_type", pa.string()),
        ("pseudonym", pa.string()),
        ("unified_id", pa.string()),
        ("valid_from", pa.timestamp("ms", tz="UTC")),
        ("valid_to", pa.timestamp("ms", tz="UTC")),
    ]
)


def write_identity_map(intervals: Sequence[MapInterval], rekey: DomainRekeyer, path: Path) -> int:
    """Write the map for ``rekey``'s domain to ``path``; returns the number of rows."""
    types, pseudonyms = [], []
    for i in intervals:
        ident = Identifier.from_node(i.node)
        types.append(ident.type)
        pseudonyms.append(rekey.value(ident.value))
    table = pa.table(
        {
            "id_type": types,
            "pseudonym": pseudonyms,
            "unified_id": [rekey.value(i.unified_id) for i in intervals],
            "valid_from": [i.valid_from for i in intervals],
            "valid_to": [i.valid_to for i in intervals],
        },
        schema=SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return int(table.num_rows)

"""Moved to ``base.files`` (below ``methods/`` and ``tasks/``); this path stays for the methods' imports."""

from base.files import (  # noqa: F401
    cache_root,
    check_writable,
    iter_jsonl,
    json_type_name,
    parse_json,
    read_bytes,
    read_json,
    read_text,
    require_shape,
    write_text,
)

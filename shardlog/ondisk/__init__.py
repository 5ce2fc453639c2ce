"""The on-disk format shared by writers and readers: segment file names and their pure
decisions (rotation, retention), and the write formats (jsonl, json, csv, payload-only)."""

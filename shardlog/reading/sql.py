"""SQL over a recording root: an in-process DuckDB with one ``records`` view.

    from shardlog import history

    con = history.connect("/srv/mqtt", "chat", since="2026-11-22T10:00Z")
    con.sql("SELECT topic, count(*) FROM records GROUP BY ALL").show()

The view (one row per record, every write format, rotated and gzipped segments)::

    topic VARCHAR     decoded from the directory path by shardlog.topics (a hashed
                      level through its +topic file), never from SQL string functions
    ts TIMESTAMPTZ    reception time, microseconds, an instant (shown in UTC: the session's zone)
    ts_us BIGINT      the same as stored: µs since the epoch
    qos UTINYINT, retain BOOLEAN
    enc VARCHAR       NULL: payload is the published JSON; 'utf8': payload is a JSON
                      string of the text; 'base64': a JSON string of the base64 bytes
    payload JSON      as the record line holds it (history's Record.value)
    props JSON        the record's MQTT 5 properties member, NULL when it has none
                      (docs/design.md); ``user_property(props, 'key')`` is the first
                      value of a user property (NULL if absent), ``user_properties(props,
                      'key')`` all of them, in order

What is pushed down, decided here in Python before DuckDB reads anything:

- the prefix: only the segment files of the topic directories at or below it are
  listed (history's directory walk), so other branches are never opened;
- the time range: a rotated segment is left out when the next segment's first record
  is before ``since``, and every segment from the first one whose first record is at
  or after ``until`` (history's ``_segments_in_range``: records of one topic do not go
  backwards in ts, so a segment's records lie between its first ts and the next
  segment's). Payload-only segments (no stored ts) are never left out. The view then
  filters ``since <= ts_us < until`` exactly.

The connection is confined to reading the root by default (shardlog.reading.sandbox:
``allowed_directories``, ``enable_external_access = false``, no extension autoload or
install, ``lock_configuration``; ``query`` also refuses statements that write, attach or
load); ``sandbox=False`` lifts it, for trusted use.

The file list is a snapshot taken by ``connect``: a segment compressed after it
makes DuckDB miss a file (``query`` lists again and retries once); segments rotated
after it are not seen until the next ``connect``.

DuckDB's readers are given exact file names: a path holding a glob character
(a topic ``a*``) is read through a symlink with a plain name in a private temporary
directory, so it can never match a sibling. Records are read per format:

- jsonl: ``read_json`` (newline delimited; a torn last line is dropped);
- json arrays and payload-only files: line by line (every format keeps one record per
  line), so a torn array (a crash, or a read racing a write) still reads;
- csv: ``read_csv``, the payload turned into the envelope's ``enc``/``payload`` by
  ``shardlog.records.encode_record`` itself (a Python function registered in DuckDB),
  so the JSON or text decision is the recorder's, not a SQL approximation.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, NamedTuple

from shardlog import extras
from shardlog.ondisk import formats
from shardlog.ondisk.formats import CURRENTS
from shardlog.ondisk.segments import rotated_segments
from shardlog.reading import sandbox as _sandbox
from shardlog.reading.files import Skipped, bounded_lines, check_regular, open_file
from shardlog.reading.ranges import _segments_in_range
from shardlog.reading.times import TimeArg, parse_time
from shardlog.reading.tree import TopicNotFound, _root, _walk
from shardlog.records import encode_record

if TYPE_CHECKING:
    import duckdb

__all__ = ["SegmentFile", "connect", "segment_files", "query"]

#: the largest JSON value DuckDB's reader accepts in one line (MQTT allows 256 MB payloads)
MAX_OBJECT = 512 * 1024 * 1024
_GLOB = frozenset("*?[]{}\\")
_HOLE_SLACK = 1024 * 1024  # holes smaller than this in all are left to DuckDB


class SegmentFile(NamedTuple):
    path: str       # the segment file on disk
    topic: str      # decoded by shardlog.topics (history's walk)
    key: str        # its format (formats.KEYS), from its name
    mtime_us: int   # the ts of payload-only records
    size: int       # bytes of its content (a .gz one: decompressed, from its trailer)
    sparse: bool = False  # a plain file with holes (read as NULs): DuckDB reads a cleaned copy


def segment_files(root: str | os.PathLike[str], prefix: str = "", since: TimeArg = None,
                  until: TimeArg = None) -> list[SegmentFile]:
    """The segment files that can hold records of ``prefix`` (and below) in
    ``[since, until)``: the pushdown. Raises ``history.TopicNotFound`` for a missing
    root, or a prefix with nothing recorded."""
    lo, hi = parse_time(since), parse_time(until)
    root_real = _root(root)
    found = list(_walk(root_real, prefix))
    if prefix and not found:
        raise TopicNotFound(f"no records for {prefix!r} under {os.fspath(root)}")
    out: list[SegmentFile] = []
    for topic, path, names in found:
        paths = [os.path.join(path, s.name) for s in rotated_segments(names)]
        paths.extend(os.path.join(path, c) for c in CURRENTS if c in names)
        for p in _segments_in_range(paths, lo, hi):
            try:
                st = check_regular(p)
            except Skipped:
                continue  # not a regular file (DuckDB would block on a FIFO): warned
            except FileNotFoundError:
                p += ".gz"  # compressed since the listing
                try:
                    st = check_regular(p)
                except FileNotFoundError:
                    continue  # removed by retention (or skipped, warned)
            size = _gz_size(p, st.st_size) if p.endswith(".gz") else st.st_size
            sparse = not p.endswith(".gz") and st.st_blocks * 512 + _HOLE_SLACK < st.st_size
            out.append(SegmentFile(p, topic, formats.of_name(p).key, st.st_mtime_ns // 1000, size, sparse))
    return out


def _gz_size(path: str, size: int) -> int:
    """The decompressed size of a gzip file from its trailer (ISIZE: modulo 4 GiB; a larger
    or unreadable one counts as MAX_OBJECT)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, size - 4))
            isize = int.from_bytes(f.read(4), "little")
    except OSError:
        return MAX_OBJECT
    if size < 4 * 1024 * 1024 or isize >= size // 2:
        # deflate packs at most ~1032:1, so under 4 MiB ISIZE has not wrapped; above, a value
        # smaller than half the file has (deflate barely expands)
        return isize
    return MAX_OBJECT


def longest_line(sizes: list[int]) -> int:
    """The line size to allow DuckDB's readers: the largest file (no line is longer),
    at least DuckDB's default; a larger limit makes DuckDB allocate larger buffers."""
    return max(16 * 1024 * 1024, min(MAX_OBJECT, max(sizes, default=0) + 1))


# -- SQL text -------------------------------------------------------------------------------


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _list(paths: list[str]) -> str:
    return "[" + ", ".join(_lit(p) for p in paths) + "]"


_ENVELOPE = ("{'ts': 'BIGINT', 'qos': 'UTINYINT', 'retain': 'BOOLEAN', 'enc': 'VARCHAR', 'props': 'JSON', "
             "'payload': 'JSON'}")
#: user properties: [[key, value], ...] in the record (shardlog.records.props_member)
_MACROS = ("CREATE OR REPLACE TEMP MACRO user_properties(props, k) AS "
           "list_transform(list_filter(CAST(props->'user' AS VARCHAR[][]), lambda x: x[1] = k), lambda x: x[2])",
           "CREATE OR REPLACE TEMP MACRO user_property(props, k) AS user_properties(props, k)[1]")
_CSV = "{'ts': 'VARCHAR', 'qos': 'VARCHAR', 'retain': 'VARCHAR', 'payload': 'VARCHAR', 'enc': 'VARCHAR'}"
_JOIN = "JOIN shardlog_files f ON f.filename = r.filename"


def _lines(paths: list[str], longest: int) -> str:
    """Every line of the files as ``s`` (without a trailing ``,`` or ``,]``), with ``filename``."""
    return (f"(SELECT filename, regexp_replace(line, ',\\]?$', '') AS s FROM read_csv({_list(paths)}, "
            "columns={'line': 'VARCHAR'}, delim=chr(1), quote='', escape='', header=false, "
            f"auto_detect=false, max_line_size={longest}, filename=true))")


def _select(key: str, paths: list[str], longest: int) -> str:
    cols = "f.topic, r.ts_us, r.qos, r.retain, r.enc, r.payload, r.props"
    if key == "jsonl":
        return (f"SELECT {cols} FROM (SELECT filename, ts AS ts_us, qos, retain, enc, props, "
                f"coalesce(payload, 'null'::JSON) AS payload FROM read_json({_list(paths)}, "
                f"format='newline_delimited', columns={_ENVELOPE}, ignore_errors=true, filename=true, "
                f"maximum_object_size={longest}) WHERE ts IS NOT NULL) r {_JOIN}")  # NULL: a torn line
    if key == "json":
        return (f"SELECT {cols} FROM (SELECT filename, TRY_CAST(j->>'ts' AS BIGINT) AS ts_us, "
                "TRY_CAST(j->>'qos' AS UTINYINT) AS qos, TRY_CAST(j->'retain' AS BOOLEAN) AS retain, "
                "j->>'enc' AS enc, j->'payload' AS payload, j->'props' AS props "
                f"FROM (SELECT filename, TRY_CAST(s AS JSON) AS j FROM {_lines(paths, longest)} "
                "WHERE s NOT IN ('[', ']', ''))) r "
                f"{_JOIN} WHERE r.ts_us IS NOT NULL AND r.qos IS NOT NULL AND r.retain IS NOT NULL "
                "AND r.payload IS NOT NULL")
    if key in ("payload.jsonl", "payload.json"):
        return ("SELECT f.topic, f.mtime_us AS ts_us, 0::UTINYINT AS qos, false AS retain, "
                "NULL::VARCHAR AS enc, r.s::JSON AS payload, NULL::JSON AS props "
                f"FROM {_lines(paths, longest)} r {_JOIN} WHERE r.s NOT IN ('[', ']', '') AND json_valid(r.s)")
    assert key == "csv", key
    return (f"SELECT {cols} FROM (SELECT filename, TRY_CAST(ts AS BIGINT) AS ts_us, "
            "TRY_CAST(qos AS UTINYINT) AS qos, "
            "CASE retain WHEN 'true' THEN true WHEN 'false' THEN false END AS retain, "
            "e->>'enc' AS enc, e->'payload' AS payload, NULL::JSON AS props "
            "FROM (SELECT *, shardlog_csv_envelope(payload, enc)::JSON AS e "
            f"FROM read_csv({_list(paths)}, columns={_CSV}, header=true, auto_detect=false, "
            "ignore_errors=true, force_not_null=['payload', 'enc'], filename=true, "
            f"max_line_size={longest}))) r {_JOIN} "
            "WHERE r.ts_us IS NOT NULL AND r.qos IS NOT NULL AND r.retain IS NOT NULL AND r.payload IS NOT NULL")


def view_sql(groups: dict[str, list[str]], since: int | None, until: int | None, longest: int = MAX_OBJECT) -> str:
    """The ``records`` view over files grouped by format key (pure); ``longest``: the
    longest line to accept."""
    parts = [_select(key, paths, longest) for key, paths in sorted(groups.items()) if paths]
    if not parts:
        parts = ["SELECT NULL::VARCHAR AS topic, NULL::BIGINT AS ts_us, NULL::UTINYINT AS qos, "
                 "NULL::BOOLEAN AS retain, NULL::VARCHAR AS enc, NULL::JSON AS payload, NULL::JSON AS props "
                 "WHERE false"]
    where = []
    if since is not None:
        where.append(f"ts_us >= {int(since)}")
    if until is not None:
        where.append(f"ts_us < {int(until)}")
    body = " UNION ALL ".join(f"({p})" for p in parts)
    return ("CREATE OR REPLACE TEMP VIEW records AS SELECT topic, make_timestamptz(ts_us) AS ts, ts_us, qos, "
            f"retain, enc, payload, props FROM ({body}) AS u" + (" WHERE " + " AND ".join(where) if where else ""))


# -- the connection ---------------------------------------------------------------------------


def _csv_envelope(payload: str | None, enc: str | None) -> str | None:
    """A CSV row's payload as the envelope line the recorder writes for it (its enc and
    payload members are what the view shows)."""
    if payload is None:
        return None
    raw = formats.csv_payload(payload, enc or "")
    if raw is None:
        return None
    return encode_record(0, 0, False, raw).decode("utf-8")


class _Safe:
    """Names DuckDB reads verbatim: a path with a glob character becomes a symlink with a
    plain name in a directory of the connection's private one (removed with it)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.dir: str | None = None
        self.n = 0

    def cleaned(self, path: str) -> str:
        """A copy of a sparse segment's lines without the holes' NUL lines (shardlog.reading.
        files, each skipped run warned about), for DuckDB, whose reader would hold a hole of
        gigabytes as one line and fail."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="links-", dir=self.base)
        self.n += 1
        copy = os.path.join(self.dir, f"{self.n}.{os.path.basename(path)[1:]}")
        try:
            with open_file(path) as f, open(copy, "wb") as out:
                for line in bounded_lines(f.read1, path):
                    out.write(line)
        except FileNotFoundError:
            open(copy, "wb").close()  # removed (or skipped, warned) since the listing: no records
        return copy

    def name(self, path: str) -> str:
        if not _GLOB.intersection(path):
            return path
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="links-", dir=self.base)
        self.n += 1
        link = os.path.join(self.dir, f"{self.n}.{os.path.basename(path)[1:]}")  # keeps the extension
        os.symlink(path, link)
        return link


def _install(con: duckdb.DuckDBPyConnection, root: str | os.PathLike[str], prefix: str,
             since: int | None, until: int | None) -> None:
    """List the files and (re)create the view; DuckDB checks the files exist when the view
    is created, so a segment compressed right after the listing makes it list again, once."""
    import duckdb

    try:
        _create(con, root, prefix, since, until)
    except duckdb.IOException:
        _create(con, root, prefix, since, until)


def _create(con: duckdb.DuckDBPyConnection, root: str | os.PathLike[str], prefix: str,
            since: int | None, until: int | None) -> None:
    files = segment_files(root, prefix, since, until)
    safe = _Safe(_sandbox.private_dir(con))
    names = [safe.cleaned(f.path) if f.sparse else safe.name(f.path) for f in files]
    files = [f._replace(size=os.path.getsize(n)) if f.sparse else f for f, n in zip(files, names, strict=True)]
    con.execute("CREATE OR REPLACE TEMP TABLE shardlog_files (filename VARCHAR, topic VARCHAR, mtime_us BIGINT)")
    if files:
        con.execute("INSERT INTO shardlog_files SELECT unnest($1), unnest($2), unnest($3)",
                    [names, [f.topic for f in files], [f.mtime_us for f in files]])
    groups: dict[str, list[str]] = {}
    for f, name in zip(files, names, strict=True):
        groups.setdefault(f.key, []).append(name)
    con.execute(view_sql(groups, since, until, longest_line([f.size for f in files])))
    for macro in _MACROS:
        con.execute(macro)


def connect(root: str | os.PathLike[str], prefix: str = "", since: TimeArg = None, until: TimeArg = None,
            con: duckdb.DuckDBPyConnection | None = None, sandbox: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (or ``con``) with a ``records`` view of the
    records of ``prefix`` and below (``''``: all) with ``since <= ts < until``. A new
    connection is confined to reading ``root`` (shardlog.reading.sandbox) unless ``sandbox``
    is False; a given ``con`` is used as it is. Without DuckDB (the ``sql`` extra): MissingExtra,
    an ImportError saying ``pip install 'shardlog[sql]'``."""
    extras.duckdb()
    import duckdb

    lo, hi = parse_time(since), parse_time(until)
    new = con is None
    if con is None:
        con = duckdb.connect()
    if new:
        # DuckDB draws its own progress bar on stdout for long queries: never into a result
        # (query_progress() still works, for the Parquet export's bar on stderr)
        con.execute("SET enable_progress_bar_print = false")
        con.execute("SET TimeZone = 'UTC'")  # ts is an instant: shown in UTC
    try:
        # null_handling as a string: DuckDB takes it so in every version, while the enum's module
        # moved (duckdb.functional in 1.x, duckdb.func in 2.x) and the stubs accept the enum only
        con.create_function("shardlog_csv_envelope", _csv_envelope, ["VARCHAR", "VARCHAR"], "VARCHAR",  # type: ignore[call-overload]
                            null_handling="special", side_effects=False)
    except duckdb.CatalogException:
        pass  # already there (connect called again on the same connection)
    if new and sandbox:
        _sandbox.confine(con, _root(root))
    _install(con, root, prefix, lo, hi)
    return con


def query(root: str | os.PathLike[str], sql: str, prefix: str = "", since: TimeArg = None,
          until: TimeArg = None, params: object = None, sandbox: bool = True) -> duckdb.DuckDBPyConnection:
    """Run ``sql`` over a fresh ``connect`` (the result is materialised: fetch it from the
    returned connection). A segment compressed or removed between the listing and the read
    (DuckDB: no such file) makes it list again and retry once. With ``sandbox`` (the default)
    a statement that is not ``sandbox.ALLOWED`` raises ``sandbox.Refused`` before anything runs."""
    extras.duckdb()
    import duckdb

    lo, hi = parse_time(since), parse_time(until)
    con = connect(root, prefix, lo, hi, sandbox=sandbox)
    if sandbox:
        _sandbox.check(con, sql)
    try:
        return con.execute(sql, params)
    except duckdb.IOException:
        _install(con, root, prefix, lo, hi)
        return con.execute(sql, params)

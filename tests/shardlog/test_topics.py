"""Tests for shardlog.topics: the topic <-> directory mapping and safe_join."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shardlog.topics import (
    HASH_MARKER,
    MAX_NAME_BYTES,
    HashedNameError,
    PathEscapeError,
    TopicError,
    decode_level,
    encode_level,
    is_hashed_name,
    relpath_to_topic,
    safe_join,
    topic_from_bytes,
    topic_to_relpath,
)

try:
    from tests import hostile
except ImportError:  # tests/ is not a package (yet): import the corpus by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hostile

SMALL = 40  # a small max_name so that hashing is exercised often

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def sha32(level: str) -> str:
    return hashlib.sha256(level.encode("utf-8")).hexdigest()[:32]


def nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def check_names(relpath: str, max_name: int = MAX_NAME_BYTES) -> None:
    """The invariants every directory name of every relpath must satisfy."""
    for name in relpath.split("/"):
        assert name, relpath
        assert 0 < nbytes(name) <= max_name
        assert "/" not in name and "\x00" not in name
        assert not name.startswith("+")
        assert name not in (".", "..")


def round_trips(topic: str, max_name: int = MAX_NAME_BYTES) -> bool:
    """Check topic -> relpath -> topic; return False if some level was hashed."""
    relpath = topic_to_relpath(topic, max_name)
    levels = topic.split("/")
    names = relpath.split("/")
    assert len(names) == len(levels)
    hashed = [is_hashed_name(n) for n in names]
    for level, name, h in zip(levels, names, hashed, strict=True):
        assert h == (nbytes(encode_level(level, 10**9)) > max_name)
        if h:
            assert name.endswith(HASH_MARKER + sha32(level))
            with pytest.raises(HashedNameError):
                decode_level(name, max_name)
        else:
            assert decode_level(name, max_name) == level
    if any(hashed):
        with pytest.raises(HashedNameError):
            relpath_to_topic(relpath, max_name)
        return False
    assert relpath_to_topic(relpath, max_name) == topic
    return True


def inside(root_real: str, path: str) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([root_real, real]) == root_real


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.path.realpath(tmp_path_factory.mktemp("root"))


# --------------------------------------------------------------------------
# Explicit mappings


@pytest.mark.parametrize(
    "topic, relpath",
    [
        ("chat/room42", "chat/room42"),
        ("/x", "%/x"),
        ("x/", "x/%"),
        ("a//b", "a/%/b"),
        ("", "%"),
        ("/", "%/%"),
        ("//", "%/%/%"),
        (".", "%2E"),
        ("..", "%2E%2E"),
        ("./.", "%2E/%2E"),
        ("../x", "%2E%2E/x"),
        ("../../etc", "%2E%2E/%2E%2E/etc"),
        ("...", "..."),
        (".hidden/a.", ".hidden/a."),
        ("a%b", "a%25b"),
        ("%", "%25"),
        ("%2E", "%252E"),
        ("%25", "%2525"),
        ("%~", "%25~"),
        ("a+b", "a%2Bb"),
        ("+log.jsonl", "%2Blog.jsonl"),
        ("sport/#", "sport/%23"),
        ("..\\..\\x", "..%5C..%5Cx"),
        ("a\nb\rc\td", "a%0Ab%0Dc%09d"),
        ("\x00", "%00"),
        ("\x1f\x7f", "%1F%7F"),
        ("\x80\x85\x9f", "%C2%80%C2%85%C2%9F"),
        ("\xa0", "\xa0"),  # NBSP is not a control character
        ("$SYS/broker/load", "$SYS/broker/load"),
        ("caf\u00e9", "caf\u00e9"),
        ("cafe\u0301", "cafe\u0301"),
        ("a\uff0fb", "a\uff0fb"),
        ("evil\u202etxt", "evil\u202etxt"),
        ("\U0001f600", "\U0001f600"),
        ("sp ace/q?a&b;c*~", "sp ace/q?a&b;c*~"),
        ("a" * 255, "a" * 255),
        ("%" * 85, "%25" * 85),
    ],
)
def test_explicit_mapping(topic: str, relpath: str) -> None:
    assert topic_to_relpath(topic) == relpath
    assert relpath_to_topic(relpath) == topic


def test_plain_level_is_returned_as_is() -> None:
    level = "".join(["room", "42"])  # a fresh, non-interned string
    assert encode_level(level) is level
    assert decode_level(level) is level


def test_hashed_name_layout() -> None:
    level = "a" * 256
    name = encode_level(level)
    assert name == "a" * (255 - 34) + "%~" + sha32(level)
    assert nbytes(name) == 255
    assert is_hashed_name(name)
    with pytest.raises(HashedNameError):
        decode_level(name)


def test_hashed_prefix_never_cuts_a_triple_or_a_character() -> None:
    # budget for the prefix at max_name=40 is 6 bytes
    assert encode_level("%" * 100, SMALL) == "%25%25%~" + sha32("%" * 100)
    assert encode_level("aaaaa" + "\n" * 50, SMALL) == "aaaaa%~" + sha32("aaaaa" + "\n" * 50)
    assert encode_level("aaaa" + "\n" * 50, SMALL) == "aaaa%~" + sha32("aaaa" + "\n" * 50)
    assert encode_level("\u00e9" * 100, SMALL) == "\u00e9\u00e9\u00e9%~" + sha32("\u00e9" * 100)
    assert encode_level("abc" + "\U0001f600" * 50, SMALL) == "abc%~" + sha32("abc" + "\U0001f600" * 50)
    for n in range(1, 60):
        for ch in ("a", "\u00e9", "\u20ac", "\U0001f600", "\n", "\x85", "%"):
            level = "b" * (n % 7) + ch * n
            name = encode_level(level, SMALL)
            assert nbytes(name) <= SMALL
            if is_hashed_name(name):
                prefix = name[: -len(HASH_MARKER) - 32]
                assert encode_level(level, 10**9).startswith(prefix)
                assert nbytes(name) > SMALL - 4  # cut at most 3 bytes short (one 4-byte char)


def test_hashed_marker_literals_are_not_hashed_names() -> None:
    fake = "x%~0123456789abcdef0123456789abcdef"
    name = encode_level(fake)
    assert name == "x%25~0123456789abcdef0123456789abcdef"
    assert not is_hashed_name(name)
    assert decode_level(name) == fake
    assert not is_hashed_name("%25~")
    assert not is_hashed_name("plain")


def test_max_name_too_small_for_a_hash() -> None:
    with pytest.raises(ValueError):
        encode_level("a" * 100, 34)
    assert encode_level("a" * 30, 34) == "a" * 30  # short levels need no hash


@pytest.mark.parametrize(
    "name",
    [
        "",  # empty
        ".",  # raw dot
        "..",  # raw dot-dot
        "%2e",  # lowercase hex
        "%2e%2e",  # lowercase hex
        "%2E%2E%2E",  # "..." is kept as is, never encoded
        "a%2Eb",  # "." is only encoded as a whole level
        "%41",  # "A" should be kept as is
        "%C3%A9",  # "é" should be kept as is
        "%2F",  # "/" is never in a level
        "%4",  # truncated escape
        "a%",  # trailing percent
        "%%",  # lone percents
        "%G0",  # bad hex
        "%zz",  # bad hex
        "%0a",  # lowercase hex of an escapable char
        "%ED%A0%80",  # encoded lone surrogate
        "%C0%AF",  # overlong "/"
        "%C2",  # truncated UTF-8 sequence
        "%FF",  # invalid UTF-8
        "+log.jsonl",  # raw "+"
        "a+b",  # raw "+"
        "#",  # raw "#"
        "a\\b",  # raw backslash
        "a\nb",  # raw control
        "\x7f",  # raw DEL
        "\x85",  # raw C1
        "\x00",  # raw NUL
        "a/b",  # slash
        "\ud800",  # lone surrogate
        "%~",  # marker without a hash
        "x%~" + "0" * 31,  # hash too short
        "x%~" + "A" * 32,  # uppercase hash
        "x%~" + "0" * 33,  # hash too long
        "a" * 256,  # longer than the limit: encode_level would have hashed it
    ],
)
def test_decode_level_rejects_non_canonical(name: str) -> None:
    with pytest.raises(TopicError) as info:
        decode_level(name)
    assert not isinstance(info.value, HashedNameError)


def test_decode_level_respects_max_name() -> None:
    assert decode_level("a" * 40, SMALL) == "a" * 40
    with pytest.raises(TopicError):
        decode_level("a" * 41, SMALL)
    with pytest.raises(TopicError):
        decode_level("%25" * 14, SMALL)  # 42 bytes


@pytest.mark.parametrize("relpath", ["", "a//b", "/a", "a/", "a/./b", "a/../b", "a/%2e"])
def test_relpath_to_topic_rejects(relpath: str) -> None:
    with pytest.raises(TopicError):
        relpath_to_topic(relpath)


def test_relpath_with_hashed_level() -> None:
    relpath = topic_to_relpath("x/" + "y" * 300 + "/z")
    assert relpath.split("/")[0] == "x" and relpath.split("/")[2] == "z"
    with pytest.raises(HashedNameError):
        relpath_to_topic(relpath)
    # an invalid component wins over a hashed one: the path is not ours at all
    with pytest.raises(TopicError) as info:
        relpath_to_topic(relpath + "/%2e")
    assert not isinstance(info.value, HashedNameError)


def test_encode_level_rejects_slash_and_surrogates() -> None:
    with pytest.raises(TopicError):
        encode_level("a/b")
    with pytest.raises(TopicError):
        encode_level("\ud800")
    with pytest.raises(TopicError):
        topic_to_relpath("ok/\udc00")


def test_exception_hierarchy() -> None:
    assert issubclass(TopicError, ValueError)
    assert issubclass(HashedNameError, TopicError)
    assert issubclass(PathEscapeError, TopicError)


# --------------------------------------------------------------------------
# topic_from_bytes


@pytest.mark.parametrize(
    "raw, topic",
    [
        (b"chat/room42", "chat/room42"),
        (b"/", "/"),
        (b"caf\xc3\xa9", "caf\u00e9"),
        (b"\xf0\x9f\x98\x80", "\U0001f600"),
        (b"\xef\xbf\xbf", "\uffff"),
        (b"a\x01\x7f\xc2\x85", "a\x01\x7f\x85"),
        (b"a" * 65535, "a" * 65535),
    ],
)
def test_topic_from_bytes_accepts(raw: bytes, topic: str) -> None:
    assert topic_from_bytes(raw) == topic
    assert topic_from_bytes(bytearray(raw)) == topic
    assert topic_from_bytes(memoryview(raw)) == topic


@pytest.mark.parametrize("raw", hostile.INVALID_TOPIC_BYTES, ids=lambda r: repr(r[:20]))
def test_topic_from_bytes_rejects(raw: bytes) -> None:
    with pytest.raises(TopicError) as info:
        topic_from_bytes(raw)
    assert info.value.reason in {"invalid-utf8", "nul", "empty", "wildcard", "too-long"}
    assert str(info.value)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty"),
        (b"a\x00", "nul"),
        (b"\xed\xa0\x80", "invalid-utf8"),
        (b"\xc0\xaf", "invalid-utf8"),
        (b"a/+/b", "wildcard"),
        (b"#", "wildcard"),
        (b"a" * 65536, "too-long"),
    ],
)
def test_topic_from_bytes_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        topic_from_bytes(raw)
    assert info.value.reason == reason


# --------------------------------------------------------------------------
# safe_join


def test_safe_join_plain(root: str) -> None:
    assert safe_join(root, "a/b") == os.path.join(root, "a/b")
    assert safe_join(root, "%2E%2E/x") == os.path.join(root, "%2E%2E/x")
    assert safe_join(root, "...") == os.path.join(root, "...")


@pytest.mark.parametrize(
    "relpath",
    ["", "..", ".", "../x", "a/../../x", "a/..", "./a", "a/./b", "a//b", "a/", "/etc", "/", "//x", "a\x00b"],
)
def test_safe_join_rejects(root: str, relpath: str) -> None:
    with pytest.raises(PathEscapeError):
        safe_join(root, relpath)


def test_safe_join_rejects_relative_root() -> None:
    with pytest.raises(PathEscapeError):
        safe_join("relative/root", "a")


def test_safe_join_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    root_real = os.path.realpath(root)
    (root / "out").symlink_to(outside)
    (root / "up").symlink_to("..")
    (root / "slash").symlink_to("/")
    (root / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (root / "inlink").symlink_to(root / "inner")
    (root / "inner" / "chain").symlink_to("../out")
    for relpath in ["out", "out/x", "up", "up/outside", "slash/etc", "dangling", "dangling/y", "inner/chain/z"]:
        with pytest.raises(PathEscapeError):
            safe_join(root_real, relpath)
    # a symlink that stays inside the root is fine; the result is not resolved
    assert safe_join(root_real, "inlink/x") == os.path.join(root_real, "inlink/x")
    assert safe_join(root_real, "inner/x") == os.path.join(root_real, "inner/x")
    # the resolved path is what counts: out of the root and back in is allowed
    assert safe_join(root_real, "up/root/inner") == os.path.join(root_real, "up/root/inner")


def test_safe_join_root_is_filesystem_root() -> None:
    assert safe_join("/", "tmp") == "/tmp" or inside("/", safe_join("/", "tmp"))


# --------------------------------------------------------------------------
# Hostile corpus


def test_hostile_corpus_shape() -> None:
    assert len(hostile.HOSTILE_TOPICS) >= 50
    assert len(hostile.HOSTILE_PAYLOADS) >= 12
    assert len(set(hostile.HOSTILE_TOPICS)) == len(hostile.HOSTILE_TOPICS)
    assert all(isinstance(p, bytes) for p in hostile.HOSTILE_PAYLOADS)
    assert all(isinstance(b, bytes) for b in hostile.INVALID_TOPIC_BYTES)
    big = hostile.big_payload(1000)
    assert len(big) == 1000 and big.startswith(b'"') and big.endswith(b'"')


@pytest.mark.parametrize("topic", hostile.HOSTILE_TOPICS, ids=lambda t: repr(t[:30]))
def test_hostile_topic(topic: str, tmp_path: Path) -> None:
    # a legal MQTT topic
    assert topic_from_bytes(topic.encode("utf-8")) == topic
    root_real = os.path.realpath(tmp_path)
    for max_name in (MAX_NAME_BYTES, SMALL):
        relpath = topic_to_relpath(topic, max_name)
        check_names(relpath, max_name)
        round_trips(topic, max_name)
        path = safe_join(root_real, relpath)
        assert inside(root_real, path)
        os.makedirs(path, exist_ok=True)
        assert os.path.isdir(path)
        assert os.path.realpath(path) == os.path.join(root_real, relpath)
    # with the default limit only levels longer than 255 bytes encoded are hashed
    if all(nbytes(encode_level(lv, 10**9)) <= MAX_NAME_BYTES for lv in topic.split("/")):
        assert round_trips(topic)


def test_hostile_topics_distinct_relpaths() -> None:
    for max_name in (MAX_NAME_BYTES, SMALL):
        relpaths = {topic_to_relpath(t, max_name) for t in hostile.HOSTILE_TOPICS}
        assert len(relpaths) == len(hostile.HOSTILE_TOPICS)


@pytest.mark.parametrize("topic", hostile.ILLEGAL_TOPICS)
def test_illegal_topic(topic: str, root: str) -> None:
    with pytest.raises(TopicError):
        topic_from_bytes(topic.encode("utf-8"))
    relpath = topic_to_relpath(topic)  # still encodes safely
    check_names(relpath)
    assert "+" not in relpath and "#" not in relpath
    assert relpath_to_topic(relpath) == topic
    assert inside(root, safe_join(root, relpath))


@pytest.mark.parametrize("topic", hostile.TOO_LONG_PATH_TOPICS, ids=lambda t: repr(t[:10]))
def test_too_long_path_topic(topic: str, tmp_path: Path) -> None:
    assert topic_from_bytes(topic.encode("utf-8")) == topic
    relpath = topic_to_relpath(topic)
    check_names(relpath)
    assert relpath_to_topic(relpath) == topic
    path = safe_join(os.path.realpath(tmp_path), relpath)
    assert nbytes(path) > 4096
    with pytest.raises(OSError) as info:
        os.makedirs(path)
    assert info.value.errno == errno.ENAMETOOLONG


# --------------------------------------------------------------------------
# Properties

LEGAL_CHARS = st.characters(codec="utf-8", exclude_characters="+#\x00")
TRICKY = st.sampled_from(
    ["/", "/", ".", "..", "%", "%2E", "%25", "%~", "\\", "~", "\n", "\r", "\x7f", "\x85", "\u00e9",
     "e\u0301", "\u202e", "\uff0f", "\U0001f600", " ", "$", "a", "A"]
)
TOPICS = st.one_of(
    st.text(LEGAL_CHARS),
    st.lists(st.one_of(TRICKY, LEGAL_CHARS), max_size=40).map("".join),
)
LEVELS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=80),
    st.lists(st.one_of(TRICKY, LEGAL_CHARS).filter(lambda s: "/" not in s), max_size=60).map("".join),
)


@SETTINGS
@given(TOPICS)
def test_prop_round_trip_and_names(topic: str) -> None:
    for max_name in (MAX_NAME_BYTES, SMALL):
        relpath = topic_to_relpath(topic, max_name)
        check_names(relpath, max_name)
        round_trips(topic, max_name)


@SETTINGS
@given(TOPICS)
def test_prop_topic_from_bytes_accepts_legal(topic: str) -> None:
    raw = topic.encode("utf-8")
    if raw:
        assert topic_from_bytes(raw) == topic


@SETTINGS
@given(TOPICS)
def test_prop_safe_join_stays_inside(root: str, topic: str) -> None:
    for max_name in (MAX_NAME_BYTES, SMALL):
        path = safe_join(root, topic_to_relpath(topic, max_name))
        assert path.startswith(root + os.sep)
        assert inside(root, path)


@SETTINGS
@given(TOPICS, TOPICS)
def test_prop_distinct_topics_distinct_relpaths(a: str, b: str) -> None:
    assume(a != b)
    for max_name in (MAX_NAME_BYTES, SMALL):
        assert topic_to_relpath(a, max_name) != topic_to_relpath(b, max_name)
        # near misses of each other
        assert topic_to_relpath(a, max_name) != topic_to_relpath(a + "/", max_name)
        assert topic_to_relpath(a, max_name) != topic_to_relpath(a + ".", max_name)


@SETTINGS
@given(LEVELS, LEVELS)
def test_prop_small_max_name_hashing(a: str, b: str) -> None:
    na, nb = encode_level(a, SMALL), encode_level(b, SMALL)
    for level, name in ((a, na), (b, nb)):
        assert 0 < nbytes(name) <= SMALL
        full = encode_level(level, 10**9)
        assert is_hashed_name(name) == (nbytes(full) > SMALL)
        if is_hashed_name(name):
            assert name.endswith("%~" + sha32(level))
            assert full.startswith(name[:-34])
        else:
            assert name == full
    if a != b:
        assert na != nb


@SETTINGS
@given(
    st.one_of(
        st.text(),
        st.lists(
            st.one_of(
                st.sampled_from(["%", "%2E", "%2e", "%25", "%~", "%0A", "%C2%85", "%41", "%ED", "%A0", "%80",
                                 "%FF", "+", ".", "..", "~", "a", "\u00e9", "\n", "/"]),
                st.builds(lambda h: "%" + h, st.text("0123456789ABCDEFabcdefg", min_size=2, max_size=2)),
                st.characters(),
            ),
            max_size=20,
        ).map("".join),
    )
)
def test_prop_decode_level_is_strict(name: str) -> None:
    for max_name in (MAX_NAME_BYTES, SMALL):
        try:
            level = decode_level(name, max_name)
        except HashedNameError:
            assert is_hashed_name(name)
            continue
        except TopicError:
            continue
        assert encode_level(level, max_name) == name


@SETTINGS
@given(LEVELS)
def test_prop_encode_decode_level(level: str) -> None:
    name = encode_level(level)
    if not is_hashed_name(name):
        assert decode_level(name) == level
    assert not name.startswith("+")

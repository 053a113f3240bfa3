import pyarrow as pa
import pytest

from storage import codecs, formats
from storage.errors import ConfigError
from tests.tables import rich_table


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("codec", sorted(codecs.CODECS))
def test_every_type_round_trips(fmt, codec):
    table = rich_table()
    _, level = codecs.resolve(codec)
    shard = formats.get(fmt)
    data = shard.encode(table, codec, level)
    back = shard.decode(data)
    assert back.schema == table.schema
    assert back.equals(table)


def test_encoding_is_deterministic():
    table = rich_table()
    for fmt in formats.FORMATS.values():
        assert fmt.encode(table, "zstd", 3) == fmt.encode(table, "zstd", 3)


@pytest.mark.parametrize(
    "codec,level,message",
    [("brotli", None, "unknown codec 'brotli'"), ("zstd", 23, "allowed: 1..22"), ("lz4", 0, "allowed: 1..12"),
     ("none", 1, "takes no level")],
)
def test_bad_codec_or_level(codec, level, message):
    with pytest.raises(ConfigError, match=message):
        codecs.resolve(codec, level)


def test_unknown_format():
    with pytest.raises(ConfigError, match="unknown shard format 'orc'; allowed: arrow, parquet"):
        formats.get("orc")


def test_zstd_shrinks_repetitive_data():
    table = pa.table({"x": pa.array([1, 2, 3, 4] * 10_000)})
    raw = formats.get("arrow").encode(table, "none", None)
    packed = formats.get("arrow").encode(table, "zstd", 3)
    assert len(packed) * 10 < len(raw)

"""Image files as a staging source: listing them in ``ImageFolder``'s layout, and reading them.

A source of images is, on any fsspec URL:

* a folder laid out as torchvision's ``ImageFolder`` expects, ``ROOT/CLASS/…/IMAGE``: one
  class per subfolder of the root, images anywhere below it; images directly in the root
  belong to no class and are left out, as ``ImageFolder`` leaves them;
* a glob (``s3://b/pets/*/*.jpg``): the class is the first folder below the glob's fixed part;
* a CSV or Parquet table with columns ``path`` and ``label``: paths relative to the
  table's folder (or absolute on the same storage), labels class names or numbers.

Images are ``.jpg``, ``.jpeg``, ``.png`` and ``.webp`` files (any case); names starting with
a dot are skipped. Classes are the sorted names (``sorted()``, as ``ImageFolder``; labels that
are all numbers sort as numbers), a class id is its index. Staging reads the files in a
seeded random order (:meth:`ImageListing.shuffled`), so that every shard mixes the classes.

Each row of the staged table is ``image`` (the file's bytes, or with ``decode`` its pixels),
``label`` (the class id) and ``path`` (the file, relative to the root). Every image is
checked while it is read (:func:`storage.images.check_image`); an unreadable one keeps its
row with a null ``image``, so the caller names it by path and fails or skips it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from storage.errors import SourceError
from storage.images import IMAGE_EXTENSIONS, BadImage, check_image, cpu_count, decode_to, thread_map
from storage.sources import EXTENSIONS, SHAPE_KEY, SourceUnit
from storage.urls import is_local, url_to_fs

IMAGES = "images"
IMAGE_COLUMN, LABEL_COLUMN, PATH_COLUMN = "image", "label", "path"
TABLE_EXTENSIONS = (".csv", ".parquet", ".pq")
LAYOUT = "one folder per class: ROOT/CLASS/IMAGE"


@dataclass(frozen=True)
class ImageUnit(SourceUnit):
    """A run of image files that one staging task reads."""

    paths: tuple[str, ...] = ()  # on the source's filesystem
    names: tuple[str, ...] = ()  # relative to the source's root: the ``path`` column
    labels: tuple[int, ...] = ()
    decode: int | None = None


@dataclass
class ImageListing:
    url: str
    root: str
    paths: list[str]
    names: list[str]
    labels: list[int]
    classes: list[str]
    sizes: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)

    def shuffled(self, seed: int) -> "ImageListing":
        """The files in a seeded random order: folders list one class after another, and shards
        (and the loader's shuffle windows within them) would otherwise hold one class each."""
        order = np.random.default_rng(seed).permutation(len(self.paths)).tolist()
        pick = lambda values: [values[i] for i in order]  # noqa: E731
        return ImageListing(self.url, self.root, pick(self.paths), pick(self.names), pick(self.labels), self.classes,
                            pick(self.sizes), pick(self.versions))

    def fingerprint(self, options: dict) -> str:
        body = json.dumps([self.url, self.paths, self.labels, self.classes, self.sizes, self.versions, options],
                          sort_keys=True)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _version(info: dict) -> str:
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or "")


def shown(fs, path: str) -> str:
    """A file as the user named it: a plain path for local files, else its URL."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def detect(url: str, fmt: str, storage_options: dict | None = None) -> ImageListing | None:
    """The images a source names, or None where it is not an image source.

    ``fmt="images"`` insists (an error says what is missing); ``"auto"`` takes a folder or
    glob holding image files and no data files (Parquet, CSV, JSON Lines, NumPy), or a
    table whose columns are exactly ``path`` and ``label``.
    """
    if fmt not in ("auto", IMAGES):
        return None
    fs, path = url_to_fs(url, storage_options)
    if path.lower().endswith(TABLE_EXTENSIONS) and "*" not in path:
        if fmt == "auto" and _columns(fs, path) != [LABEL_COLUMN, PATH_COLUMN]:
            return None
        return _from_table(fs, path, url, _read_list(fs, path, url))
    glob = any(ch in path for ch in "*?[")
    try:
        if glob:
            root = path[:min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            infos = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            root, infos = path.rstrip("/"), fs.find(path, detail=True)
        else:
            return None if fmt == "auto" else _missing(fs, path, url)
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise SourceError(f"cannot list source {url!r}: {exc}") from None
    relative = {p: p[len(root):].lstrip("/") for p in infos}
    if fmt == "auto" and (not any(_is_image(p) for p in infos)
                          or any(p.lower().endswith(tuple(EXTENSIONS)) for p in infos)):
        return None
    images = sorted(p for p in infos if _is_image(p) and not _hidden(relative[p]))
    in_classes = [p for p in images if "/" in relative[p]]
    if not in_classes:
        loose = len(images)
        where = f"{loose} image file(s) directly in {url!r} but none" if loose else "no image files"
        raise SourceError(f"source {url!r} holds {where} in class folders (looked for "
                          f"{', '.join(IMAGE_EXTENSIONS)}; {LAYOUT}, or a CSV/Parquet table of path,label)")
    class_of = {p: relative[p].split("/", 1)[0] for p in in_classes}
    classes = sorted(set(class_of.values()))
    ids = {c: i for i, c in enumerate(classes)}
    return ImageListing(url, root, in_classes, [relative[p] for p in in_classes], [ids[class_of[p]] for p in in_classes],
                        classes, [int(infos[p].get("size") or 0) for p in in_classes],
                        [_version(infos[p]) for p in in_classes])


def _missing(fs, path: str, url: str):
    if fs.exists(path):
        raise SourceError(f"source {url!r} is a file; images are staged from a folder ({LAYOUT}), a glob, "
                          "or a CSV/Parquet table of path,label")
    raise SourceError(f"source {url!r} does not exist")


def _columns(fs, path: str) -> list[str] | None:
    """A table's column names, sorted, from its schema alone (None where it cannot be read)."""
    try:
        with fs.open(path, "rb") as f:
            if path.lower().endswith(".csv"):
                return sorted(pacsv.open_csv(f).schema.names)
            return sorted(pq.ParquetFile(f).schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError):
        return None


def _read_list(fs, path: str, url: str) -> pa.Table:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f) if not path.lower().endswith(".csv") else pacsv.read_csv(f)
    except FileNotFoundError:
        raise SourceError(f"source {url!r} does not exist") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(f"cannot read the image list {url!r}: {str(exc).splitlines()[0][:200]}") from None


def _from_table(fs, path: str, url: str, table: pa.Table) -> ImageListing:
    missing = [c for c in (PATH_COLUMN, LABEL_COLUMN) if c not in table.schema.names]
    if missing:
        raise SourceError(f"the image list {url!r} lacks column(s) {', '.join(missing)} "
                          f"(has: {', '.join(table.schema.names)}); it needs path and label")
    if table.num_rows == 0:
        raise SourceError(f"the image list {url!r} has no rows; nothing to stage")
    for name in (PATH_COLUMN, LABEL_COLUMN):
        if table.column(name).null_count:
            raise SourceError(f"the image list {url!r} has {table.column(name).null_count} empty {name!r} value(s)")
    base = path.rsplit("/", 1)[0]
    names = [str(p) for p in table.column(PATH_COLUMN).to_pylist()]
    paths = [fs._strip_protocol(n) if "://" in n or n.startswith("/") else f"{base}/{n}" for n in names]
    bad = [n for n in names if not _is_image(n)]
    if bad:
        raise SourceError(f"the image list {url!r} names {len(bad)} file(s) that are not images, e.g. {bad[0]!r}; "
                          f"allowed: {', '.join(IMAGE_EXTENSIONS)}")
    raw = table.column(LABEL_COLUMN).to_pylist()
    numeric = pa.types.is_integer(table.schema.field(LABEL_COLUMN).type)
    classes = [str(c) for c in sorted(set(raw))] if numeric else sorted({str(c) for c in raw})
    ids = {c: i for i, c in enumerate(classes)}
    sizes, versions = [], []
    for p in paths:
        try:
            info = fs.info(p)
        except FileNotFoundError:
            raise SourceError(f"the image list {url!r} names {shown(fs, p)!r}, which does not exist") from None
        sizes.append(int(info.get("size") or 0))
        versions.append(_version(info))
    return ImageListing(url, base, paths, names, [ids[str(c)] for c in raw], classes, sizes, versions)


def units(listing: ImageListing, unit_bytes: int, decode: int | None) -> list[ImageUnit]:
    """The listing cut into runs of about ``unit_bytes`` (of files, or of decoded pixels)."""
    out: list[ImageUnit] = []
    start, acc = 0, 0
    n = len(listing.paths)
    for i in range(n):
        acc += 3 * decode * decode if decode else max(1, listing.sizes[i])
        if acc >= unit_bytes or i == n - 1:
            sl = slice(start, i + 1)
            out.append(ImageUnit(listing.url, IMAGES, start, i + 1, i + 1 - start, acc, tuple(listing.paths[sl]),
                                 tuple(listing.names[sl]), tuple(listing.labels[sl]), decode))
            start, acc = i + 1, 0
    return out


def schema(decode: int | None) -> pa.Schema:
    if decode:
        image = pa.field(IMAGE_COLUMN, pa.list_(pa.uint8(), 3 * decode * decode),
                         metadata={SHAPE_KEY: json.dumps([3, decode, decode]).encode()})
    else:
        image = pa.field(IMAGE_COLUMN, pa.binary())
    return pa.schema([image, pa.field(LABEL_COLUMN, pa.int64()), pa.field(PATH_COLUMN, pa.string())])


def read_unit(unit: ImageUnit, storage_options: dict | None = None) -> pa.Table:
    """A unit's rows; an image that does not decode whole has a null ``image``."""
    fs, _ = url_to_fs(unit.url, storage_options)
    try:
        found = fs.cat(list(unit.paths), on_error="return")
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise SourceError(f"cannot read the images of {unit.url!r}: {exc}") from None
    datas = []
    for p in unit.paths:
        data = found.get(p, found.get(fs._strip_protocol(p)))
        if not isinstance(data, bytes):
            raise SourceError(f"image {shown(fs, p)!r} disappeared while staging ({data!r:.200})")
        datas.append(data)

    def one(data: bytes):
        try:
            if unit.decode:
                return decode_to(data, unit.decode).reshape(-1)
            check_image(data)
            return data
        except BadImage:
            return None

    results = thread_map(one, datas, min(4, cpu_count()))
    if unit.decode:
        width = 3 * unit.decode * unit.decode
        valid = np.array([r is not None for r in results])
        pixels = np.zeros((len(results), width), dtype=np.uint8)
        for i, r in enumerate(results):
            if r is not None:
                pixels[i] = r
        image = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), width, mask=pa.array(~valid))
    else:
        image = pa.array(results, pa.binary())
    return pa.Table.from_arrays([image, pa.array(unit.labels, pa.int64()), pa.array(unit.names, pa.string())],
                                schema=schema(unit.decode))

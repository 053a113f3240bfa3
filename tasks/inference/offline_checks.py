"""What must hold before offline inference writes anything: the model's input column in
the dataset (present, numeric, as wide as the model's input) and an output folder of the
predictions' own. Each failure is a :class:`~storage.errors.SwarmError` naming the value."""

from __future__ import annotations

import math

import pyarrow as pa

from storage import manifest as manifest_mod
from storage.dataset import Dataset
from storage.errors import ConfigError, DestinationError
from storage.urls import protocol_of, url_to_fs
from tasks.inference.prediction_shards import PREDICTIONS_KIND
from tasks.storage_access import check_destination
from tasks.training.data import Columns


def model_columns(model: str, meta: dict, ds: Dataset, keep: list[str] = ()) -> Columns:
    """The dataset column(s) the model reads, checked: present, numeric, as wide as the model's
    input. Shape and scale are the model's, as recorded at training, else the dataset's; a
    model trained on table columns reads and encodes them as training did. ``keep`` names
    columns carried into the predictions, checked present."""
    trained = meta.get("columns") or {}
    described = ds.manifest.metadata
    names = ds.schema.names
    missing_kept = [c for c in keep if c not in names]
    if missing_kept:
        raise ConfigError(f"--keep-columns {', '.join(map(repr, missing_kept))}: dataset {ds.url!r} has no such "
                          f"column (columns: {', '.join(names)})")
    if trained.get("features"):
        cols = Columns.from_record(trained, label=None)
        lacking = [c for c in cols.table.names if c not in names]
        if lacking:
            raise ConfigError(f"model {model!r} reads feature column(s) {', '.join(map(repr, lacking))}, which dataset "
                              f"{ds.url!r} lacks (columns: {', '.join(names)})")
        return cols
    feature = trained.get("feature") or described.get("feature")
    if not feature:
        raise ConfigError(f"model {model!r} does not record its input column and dataset {ds.url!r} does not name "
                          f"one (columns: {', '.join(names)}); train the model with Swarm")
    if feature not in names:
        raise ConfigError(f"model {model!r} reads column {feature!r}, which dataset {ds.url!r} lacks "
                          f"(columns: {', '.join(names)})")
    ftype = ds.schema.field(feature).type
    image = trained.get("image")  # a model trained on image files: decoded here as for validation
    if image is not None:
        image = {**image, "stored": "encoded" if pa.types.is_binary(ftype) else "decoded"}
        if image["stored"] == "encoded":
            return Columns(feature, "", tuple(trained["shape"]), None, image=image)
    width, values = (ftype.list_size, ftype.value_type) if pa.types.is_fixed_size_list(ftype) else (1, ftype)
    if not (pa.types.is_integer(values) or pa.types.is_floating(values)):
        raise ConfigError(f"column {feature!r} of dataset {ds.url!r} is {ftype}; model {model!r} needs numbers "
                          "or fixed-size lists of numbers")
    shape = trained.get("shape") or described.get("shape")
    if shape and math.prod(shape) != width:
        raise ConfigError(f"model {model!r} takes rows of shape {list(shape)} ({math.prod(shape)} values); column "
                          f"{feature!r} of dataset {ds.url!r} has {width} values per row")
    scale = trained["scale"] if "scale" in trained else described.get("scale")
    labels = Columns.from_record(trained).labels
    return Columns(feature, "", tuple(shape) if shape else None, scale, None, labels, image)


def check_output(output: str, dataset: str, storage_options: dict, kind: str = PREDICTIONS_KIND):
    """``(fs, root)`` of an output the predictions (or another ``kind`` of output dataset) may
    go to: a folder (or a new path) of its own, holding nothing or an earlier output of that
    kind. Removing shards that the manifest does not name is then safe."""
    fs, root = check_destination(output, storage_options, role="output")
    if _overlap(output, dataset, storage_options):
        raise ConfigError(f"output {output!r} overlaps dataset {dataset!r}; {kind} need a folder of "
                          "their own, neither inside the dataset nor around it")
    previous = manifest_mod.read_if_exists(fs, root)
    if previous is not None and previous.metadata.get("kind") != kind:
        raise DestinationError(f"output {output!r} holds a dataset that is not {kind} "
                               f"(kind {previous.metadata.get('kind')!r}); give a new folder for the {kind}")
    return fs, root


def _overlap(a: str, b: str, storage_options: dict) -> bool:
    (fa, pa_), (fb, pb) = (url_to_fs(u.split("::")[-1], storage_options) for u in (a, b))
    if protocol_of(fa) != protocol_of(fb):
        return False
    pa_, pb = pa_.rstrip("/") + "/", pb.rstrip("/") + "/"
    return pa_.startswith(pb) or pb.startswith(pa_)

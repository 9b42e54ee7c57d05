"""The one located-error base (compressor.errors.LocatedError): every layer's errors
that say where keep their message text and their fields across pickling, which is
how Ray hands a worker's error to the driver."""

import pickle

import pytest

from compressor.errors import ChecksumError, LocatedError, SourceError
from eval_jobs.errors import DatasetError
from workflows.errors import ConditionFailedError, StoreError

CASES = [
    (SourceError("NaN found", file="m.safetensors", tensor="enc.w"), "NaN found (file m.safetensors, tensor 'enc.w')",
     {"file": "m.safetensors", "tensor": "enc.w"}),
    (ChecksumError("sha256 differs", file="s.safetensors"), "sha256 differs (file s.safetensors)",
     {"file": "s.safetensors", "tensor": None}),
    (DatasetError("bad box", file="ann.json", item="annotation 7"), "bad box (file ann.json, annotation 7)",
     {"file": "ann.json", "item": "annotation 7"}),
    (DatasetError("no images"), "no images", {"file": None, "item": None}),
    (StoreError("get s3://b/k: denied", key="k"), "get s3://b/k: denied", {"key": "k"}),
    (ConditionFailedError("s3://b/k exists already", key="k"), "s3://b/k exists already", {"key": "k"}),
]


@pytest.mark.parametrize("err,text,fields", CASES, ids=lambda c: type(c).__name__ if isinstance(c, Exception) else "")
def test_message_and_fields_survive_pickling(err, text, fields):
    assert isinstance(err, LocatedError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    for e in (err, back):
        assert str(e) == text
        assert {k: getattr(e, k) for k in fields} == fields
        assert e.detail == text.split(" (")[0]


def test_long_tensor_names_are_cut_in_the_message_not_in_the_field():
    name = "w" * 1000
    err = SourceError("bad", file="f", tensor=name)
    assert err.tensor == name and len(str(err)) < 400 and str(err).endswith("...)")


def test_an_unknown_location_field_is_a_type_error():
    with pytest.raises(TypeError):
        SourceError("bad", item="x")
    with pytest.raises(TypeError, match="no location field"):
        LocatedError("bad", file="f")

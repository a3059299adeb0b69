"""Runs gcp-storage-emulator (a real GCS JSON-API server) on 127.0.0.1 for the storage tests.

    python tests/gcs_emulator.py PORT BUCKET

Two GCS behaviours the emulator lacks and tensorstore's GCS driver (orbax's array store) relies on,
added here; everything else is the emulator as published:
- media downloads carry the object's `x-goog-generation` header (tensorstore reads an object's
  generation from it: "Malformed StorageGeneration" without it);
- the generation preconditions `ifGenerationMatch` (412 when the object's generation differs; 0 means
  "must not exist") and `ifGenerationNotMatch` (304 when it is equal). OCDBT commits its manifest with
  conditional writes and reads; without them concurrent commits overwrite each other.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_ORIGINAL = {fn: fn for fn in (objects.download, objects.get, objects.insert, objects.delete)}


def _generation(storage, bucket: str, name: str | None) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
    except NotFound:
        return "0"


def _precondition_failed(request, storage, name: str | None) -> HTTPStatus | None:
    current = _generation(storage, request.params["bucket_name"], name)
    match = request.query.get("ifGenerationMatch", [None])[0]
    if match is not None and match != current:
        return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch", [None])[0]
    if not_match is not None and not_match == current:
        return HTTPStatus.NOT_MODIFIED
    return None


def _conditional(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        name = request.params.get("object_id") or request.query.get("name", [None])[0]
        status = _precondition_failed(request, storage, name)
        if status is not None:
            response.status = status
            return None
        result = handler(request, response, storage, *args, **kwargs)
        if handler is objects.download and response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return result
    return wrapped


_WRAPPED = {fn: _conditional(fn) for fn in _ORIGINAL}
server.HANDLERS = tuple((pattern, {method: _WRAPPED.get(fn, fn) for method, fn in handlers.items()})
                        for pattern, handlers in server.HANDLERS)


def main(port: int, bucket: str) -> None:
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])

"""Runs gcp-storage-emulator (a real GCS JSON-API server) on 127.0.0.1 for the storage tests.

    python tests/gcs_emulator.py PORT BUCKET

One addition to the emulator: its media downloads carry no `x-goog-generation` header, which real GCS
sends and tensorstore's GCS driver (orbax's array store) requires ("Malformed StorageGeneration" on
every read of an existing object, e.g. an OCDBT manifest). The wrapper below adds the object's
generation and metageneration to download responses; everything else is the emulator as published.
"""
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


server.HANDLERS = tuple((pattern, {method: _download_with_generation if fn is _download else fn
                                   for method, fn in handlers.items()})
                        for pattern, handlers in server.HANDLERS)


def main(port: int, bucket: str) -> None:
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])

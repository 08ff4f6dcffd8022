"""LitServe serving `bench.peer_handlers.Classifier` (see there); started by `bench peers`.

The LitAPI is a module-level class: LitServe starts its inference worker with `spawn`, which
pickles the API by reference. No `from __future__ import annotations`: LitServe compares
`decode_request`'s annotation with the `Request` class itself to decide to parse the form.
"""

from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request

from bench.peer_handlers import Classifier


class FashionAPI(ls.LitAPI):
    """Decode each upload in the API process, batch, one forward pass, top class as JSON."""

    def setup(self, device: str) -> None:
        self.classifier = Classifier()

    def decode_request(self, request: Request) -> np.ndarray:
        # LitServe hands this annotation's route the parsed form (FormData), not the Request
        form: Any = request
        return Classifier.decode(form["files"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, x: list[np.ndarray]) -> list[dict[str, Any]]:
        return self.classifier.predict(x)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def serve(port: int, max_batch_size: int, batch_timeout: float) -> None:
    """LitServe on loopback: one CPU worker, dynamic batching as configured."""
    api = FashionAPI(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(
        host="127.0.0.1",
        port=port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )

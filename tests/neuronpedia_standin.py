"""A local stand-in of Neuronpedia's feature API, for tests and for offline runs on the hub twin.

It answers `GET /api/feature/{modelId}/{source}/{index}` on 127.0.0.1 with the recorded payloads
in tests/data/neuronpedia/ (their README says how they were written), and a JSON 404 for anything
else, as the real site does, unless a test scripts other replies for a path (429, 500, a hang,
broken JSON). With `synthesize=True` a feature that has no recorded payload gets one made from a
recorded template (gpt2-small/4-res-jb/14801) with its own source and index, an explanation naming
it, and the template's density and scores: what the study's selection accepts. That serves any
feature the selection may ask for, e.g. for the gpt2-small preset run end to end on the twin.

    python -m tests.neuronpedia_standin [--port N] [--synthesize]   # prints its URL, serves until killed
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAYLOADS = Path(__file__).parent / "data" / "neuronpedia"
TEMPLATE = PAYLOADS / "gpt2-small" / "4-res-jb" / "14801.json"
_FEATURE_PATH = re.compile(r"^/api/feature/([\w.-]+)/([\w.-]+)/(\d+)$")


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: the payload file (or 404 when there is none)
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # answer nothing until the server stops: the client times out


def synthesized_payload(model_id: str, source: str, index: int) -> bytes:
    body = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    body = copy.deepcopy(body) | {"modelId": model_id, "layer": source, "index": str(index)}
    body["source"] = body["source"] | {"id": source, "modelId": model_id}
    for activation in body["activations"]:
        activation.update(modelId=model_id, layer=source, index=str(index))
    body["explanations"][0]["description"] = f" stand-in explanation of {source} feature {index}"
    return json.dumps(body).encode()


class FakeNeuronpedia:
    def __init__(self, port: int = 0, synthesize: bool = False):
        self.requests: list[str] = []
        self.scripts: dict[str, list[Reply]] = {}
        self.synthesize = synthesize
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)
        self._thread.start()

    def script(self, path: str, *replies: Reply) -> None:
        self.scripts[path] = list(replies)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str) -> tuple[int, bytes]:
        file = PAYLOADS / (path.removeprefix("/api/feature/") + ".json")
        if file.is_file():
            return 200, file.read_bytes()
        m = _FEATURE_PATH.match(path)
        if self.synthesize and m:
            return 200, synthesized_payload(m.group(1), m.group(2), int(m.group(3)))
        return 404, b'{"error":"Not Found"}'


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        fake: FakeNeuronpedia = self.server.fake
        fake.requests.append(self.path)
        script = fake.scripts.get(self.path)
        reply = script.pop(0) if script else Reply()
        if reply.hang:
            fake.release.wait(10)
            return
        status, body = (reply.status, reply.body) if reply.body is not None else fake.answer(self.path)
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **reply.headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002, ARG002 - keep output quiet
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--synthesize", action="store_true", help="answer every feature, recorded or not")
    args = parser.parse_args()
    server = FakeNeuronpedia(args.port, args.synthesize)
    print(server.url, flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

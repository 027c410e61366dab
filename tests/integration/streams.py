"""Reading a generation archive's replies over plain HTTP: a POST's chunks as they arrive, TorchServe JSON pieces,
OpenAI's Server-Sent Events."""

import http.client
import json
import time


def post_stream(server, path, body, timeout=120):
    """POST ``body``; (status, content type, [(bytes of a chunk, seconds after sending)])."""
    connection = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request("POST", path, json.dumps(body),
                           {**server.auth_header("inference"), "Content-Type": "application/json"})
        response = connection.getresponse()
        chunks = []
        while data := response.read1(65536):
            chunks.append((data, time.perf_counter() - started))
        return response.status, response.getheader("Content-Type"), chunks
    finally:
        connection.close()


def sse_events(chunks):
    """The ``data:`` payloads of a Server-Sent Events body, in order; every event ends with a blank line."""
    text = b"".join(data for data, _ in chunks).decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: "):] for event in events]


def json_pieces(chunks):
    decoder, values, text = json.JSONDecoder(), [], b"".join(data for data, _ in chunks).decode()
    while text.strip():
        value, end = decoder.raw_decode(text.lstrip())
        values.append(value)
        text = text.lstrip()[end:]
    return values

"""A small client for raylm's gRPC front (raylm.proto).

    client = GenerateClient("127.0.0.1:9000", api_key="s3cret")
    print(client.generate("The capital of France is", max_tokens=16, temperature=0).completions[0].text)
    for delta in client.generate_stream("Once upon a time", max_tokens=32):
        print(delta.completions[0].text, end="", flush=True)

Over TLS: `GenerateClient(target, root_certificates=open("cert.pem", "rb").read())`
(or `tls=True` for a certificate the system trusts).

Also a command: `python -m raylm.cluster.grpc_client --target 127.0.0.1:9000 "Hello"`
(`--api-key`, default $RAYLM_API_KEY; `--ssl-ca-cert cert.pem` or `--tls`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Optional, Sequence, Union

import grpc

from raylm.cluster import raylm_pb2 as pb
from raylm.cluster import raylm_pb2_grpc as pb_grpc

_SAMPLING_FIELDS = frozenset(f.name for f in pb.GenerateRequest.DESCRIPTOR.fields) - {
    "request_id", "prompt", "prompt_token_ids"}


def build_request(prompt: Union[str, Sequence[int]], request_id: str = "",
                  **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from a text prompt or token ids and SamplingParams-named keywords
    (None leaves a field unset, so the server's default applies)."""
    unknown = sorted(set(sampling) - _SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling field(s) {unknown}; known: {sorted(_SAMPLING_FIELDS)}")
    fields = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    else:
        fields["prompt_token_ids"] = list(prompt)
    return pb.GenerateRequest(request_id=request_id, **fields)


class GenerateClient:
    """Blocking client. `api_key` goes in the `authorization: Bearer KEY` metadata;
    with `root_certificates` (PEM bytes) or `tls`, the channel is TLS. `app_name` goes
    in the `application` metadata that Ray Serve's gRPC proxy routes on (raylm's own
    gRPC server ignores it)."""

    def __init__(self, target: str = "127.0.0.1:9000", app_name: Optional[str] = "raylm",
                 timeout: Optional[float] = None, api_key: Optional[str] = None,
                 root_certificates: Optional[bytes] = None, tls: bool = False):
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerateStub(self.channel)
        self.metadata = (("application", app_name),) if app_name else ()
        if api_key:
            self.metadata += (("authorization", f"Bearer {api_key}"),)
        self.timeout = timeout

    def generate(self, prompt: Union[str, Sequence[int]], request_id: str = "",
                 **sampling) -> pb.GenerateResponse:
        """The finished result. Errors raise grpc.RpcError (INVALID_ARGUMENT for bad input)."""
        return self.stub.Generate(build_request(prompt, request_id, **sampling),
                                  metadata=self.metadata, timeout=self.timeout)

    def generate_stream(self, prompt: Union[str, Sequence[int]], request_id: str = "",
                        **sampling) -> Iterator[pb.GenerateResponse]:
        """Delta responses as the request progresses; the last has finished=True.
        Leaving the loop early cancels the call, which aborts the request on the server."""
        call = self.stub.GenerateStream(build_request(prompt, request_id, **sampling),
                                        metadata=self.metadata, timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the call is complete

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GenerateClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raylm.cluster.grpc_client",
                                     description="Generate text through raylm's gRPC front")
    parser.add_argument("prompt")
    parser.add_argument("--target", default="127.0.0.1:9000")
    parser.add_argument("--app", default="raylm", help="Ray Serve application name")
    parser.add_argument("--api-key", default=os.environ.get("RAYLM_API_KEY"),
                        help="the server's --api-key (default: $RAYLM_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect over TLS")
    parser.add_argument("--ssl-ca-cert", default=None,
                        help="PEM file of the CA (or self-signed certificate) to trust; implies --tls")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stream", action="store_true", help="print text as it arrives")
    ns = parser.parse_args(argv)
    sampling = dict(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                    seed=ns.seed)
    roots = None
    if ns.ssl_ca_cert:
        with open(ns.ssl_ca_cert, "rb") as f:
            roots = f.read()
    with GenerateClient(ns.target, ns.app, api_key=ns.api_key, root_certificates=roots,
                        tls=ns.tls) as client:
        try:
            if ns.stream:
                for delta in client.generate_stream(ns.prompt, **sampling):
                    for c in delta.completions:
                        print(c.text, end="", flush=True)
                print()
            else:
                print(client.generate(ns.prompt, **sampling).completions[0].text)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`raylm generate|serve|bench` (also `python -m raylm`)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from raylm.cluster.reasoning import REASONING_PARSERS
from raylm.engine.config import EngineArgs

# Defaults of raylm.cluster (local, limits, drain, app), repeated so that `raylm --help`
# does not import the cluster; tests/test_cli.py checks they agree.
DEFAULT_MAX_QUEUED_REQUESTS = 4096
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_MAX_PROMPTS_PER_REQUEST = 1024
DEFAULT_MAX_SEQS_PER_REQUEST = 4096


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_engine_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("model",)) -> None:
    """One flag per EngineArgs field, spelled as in `vllm serve` (--max-model-len ...)."""
    group = parser.add_argument_group("engine arguments")
    for f in dataclasses.fields(EngineArgs):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            group.add_argument(flag, type=_bool, nargs="?", const=True, default=default, metavar="BOOL")
            if default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            group.add_argument(flag, type=type(default), default=default)
        elif f.name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes"):
            group.add_argument(flag, type=int, default=None)
        else:
            group.add_argument(flag, type=str, default=default)
    group.add_argument("--tp", dest="tensor_parallel_size", type=int, help="alias of --tensor-parallel-size")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)}
    return EngineArgs(**kwargs)


def _generate(ns: argparse.Namespace) -> int:
    from raylm.engine.llm import LLM
    from raylm.engine.sampling_params import SamplingParams

    args = engine_args_from(ns)
    kwargs = dataclasses.asdict(args)
    model = kwargs.pop("model")
    llm = LLM(model, **kwargs)
    sp = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                        max_tokens=ns.max_tokens, seed=ns.seed_sampling, n=ns.n)
    prompts = ns.prompt or ["Hello, my name is"]
    if ns.chat:
        outs = [llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        for comp in out.outputs:
            print(comp.text if ns.chat else prompt + comp.text)
            print("---")
    llm.shutdown()
    return 0


def _serve(ns: argparse.Namespace) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and run the Serve app until Ctrl-C
    or SIGTERM; then drain it (see raylm.cluster.drain) and delete it. Serve and Ray
    are shut down only when this process started them."""
    import os
    import signal
    import time

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    joined = bool(os.environ.get("RAY_ADDRESS"))  # else a new local cluster, ours to stop
    if not joined:  # one node: Ray's own sockets on 127.0.0.1 (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = dataclasses.asdict(engine_args_from(ns))
    args["model"] = ns.model_tag or ns.model
    tls = dict(ssl_keyfile=ns.ssl_keyfile, ssl_certfile=ns.ssl_certfile)
    app_args = dict(args, num_groups=ns.groups, served_model_name=ns.served_model_name,
                    api_key=ns.api_key, max_n=ns.max_n, max_queued_requests=ns.max_queued_requests,
                    api_server_count=ns.api_server_count, http_host=ns.host, http_port=ns.port,
                    grpc_port=ns.grpc_port, step_timeout=ns.step_timeout,
                    queue_timeout=ns.queue_timeout, max_request_body_bytes=ns.max_request_body_bytes,
                    protect_health_metrics=ns.protect_health_metrics,
                    shutdown_timeout=ns.shutdown_timeout,
                    max_prompts_per_request=ns.max_prompts_per_request,
                    max_seqs_per_request=ns.max_seqs_per_request, **tls,
                    enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser,
                    reasoning_parser=ns.reasoning_parser)
    from raylm.cluster.app import APP_NAME, build_app

    app = build_app(app_args)  # argument errors surface before Ray starts

    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
             configure_logging=False)
    stop = {"signal": None}

    def _on_signal(signum, frame):
        stop["signal"] = signum

    scheme = "https" if ns.ssl_certfile else "http"
    try:
        serve_port = ns.serve_http_port or _free_port(ns.host)
        # No grpc_options: Serve's gRPC proxy binds every interface, without TLS; the
        # ingress replicas serve gRPC themselves (grpc_port).
        serve.start(http_options={"host": ns.host, "port": serve_port,
                                  **{k: v for k, v in tls.items() if v}})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        print(f"raylm: serving {app_args['model'] or 'SmolLM2-135M-Instruct (embedded)'} on "
              f"{scheme}://{ns.host}:{ns.port}/v1 (gRPC {ns.host}:{ns.grpc_port}"
              f"{' with TLS' if ns.ssl_certfile else ''}; Ray Serve's HTTP proxy "
              f"{ns.host}:{serve_port}; Ray at {ray.get_runtime_context().gcs_address}, the "
              f"RAY_ADDRESS for Python handles); Ctrl-C to stop", flush=True)
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        while stop["signal"] is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: stop waiting
        print(f"raylm: shutting down: requests in flight get up to {ns.shutdown_timeout:g} s "
              f"to finish", flush=True)
        try:
            serve.delete(APP_NAME)  # only ours: the cluster may serve other applications
            if not joined:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _add_front_door_args(srv: argparse.ArgumentParser) -> None:
    """TLS, limits and shutdown of `raylm serve` (vLLM's spelling where vLLM has one)."""
    srv.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM), for HTTP and gRPC")
    srv.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM), for HTTP and gRPC")
    srv.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                     help="larger request bodies get 413 while they are read (and larger gRPC "
                          "messages RESOURCE_EXHAUSTED)")
    srv.add_argument("--protect-health-metrics", action="store_true",
                     help="require the API key on /health and /metrics too")
    srv.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                     help="on Ctrl-C or SIGTERM, seconds requests in flight get to finish (new "
                          "ones get 503); the rest end with finish_reason 'abort'")
    srv.add_argument("--max-prompts-per-request", type=int, default=DEFAULT_MAX_PROMPTS_PER_REQUEST,
                     help="largest number of prompts in one /v1/completions request")
    srv.add_argument("--max-seqs-per-request", type=int, default=DEFAULT_MAX_SEQS_PER_REQUEST,
                     help="largest number of prompts x n in one request")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help='allow tool_choice "auto" (needs --tool-call-parser), as in vLLM')
    srv.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                     help="how tool calls are read from the model's text under tool_choice auto")
    srv.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                     help="put chat outputs' <think>...</think> text in reasoning_content, as vLLM does")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="LLM inference and serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline with one model")
    gen.add_argument("prompt", nargs="*", help="prompt(s); default: a greeting")
    gen.add_argument("--model", default=None, help="model dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sampling-seed", dest="seed_sampling", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve a model over the OpenAI API (and gRPC) on Ray Serve")
    srv.add_argument("model_tag", nargs="?", default=None,
                     help="model dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--model", default=None, help="same as the positional MODEL")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000,
                     help="port of the gRPC service (raylm.Generate), on --host like HTTP")
    srv.add_argument("--serve-http-port", type=int, default=None,
                     help="port of Ray Serve's HTTP proxy (default: a free one); --port is served "
                          "by the ingress replicas themselves")
    srv.add_argument("--groups", "--num-groups", dest="groups", type=int, default=1,
                     help="worker groups (data-parallel replicas of the model)")
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every HTTP route but /health "
                          "and /metrics, and the metadata 'authorization: Bearer KEY' on gRPC")
    srv.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    srv.add_argument("--api-server-count", type=int, default=1,
                     help="ingress replicas (tokenize, detokenize, HTTP and gRPC); each reads "
                          "every worker group's output stream")
    srv.add_argument("--step-timeout", type=float, default=60.0,
                     help="seconds without a step, while holding work, after which a worker group "
                          "counts as hung: it is restarted and its requests move to another group")
    srv.add_argument("--queue-timeout", type=float, default=60.0,
                     help="seconds a request waits for a serving worker group before a 503")
    srv.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                     help="requests that may wait for a slot; past it a request gets 429 "
                          "with Retry-After")
    _add_front_door_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as exc:
        print(f"raylm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

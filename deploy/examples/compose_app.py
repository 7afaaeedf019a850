"""A second Serve application that uses raylm through a deployment handle.

`Summarizer` serves POST /summarizer/summarize ({"text": ...} -> {"summary": ...}) and
POST /summarizer/summarize/stream (the summary as plain text, streamed). It calls the
`raylm` application's handle methods, which take and return raylm's own Python objects
(`SamplingParams` in, `RequestOutput` out), with no HTTP or JSON in between:

    handle = serve.get_app_handle("raylm")
    out = await handle.generate.remote(prompt, SamplingParams(max_tokens=64))
    async for out in handle.options(stream=True).generate_stream.remote(prompt, params):
        ...  # cumulative: out.outputs[0].text is the whole text so far

Run it (from the repository root):

    # both applications in one local Ray, then one request to each endpoint
    python deploy/examples/compose_app.py [--model DIR_OR_GGUF]

    # or next to a running raylm app on a cluster (after `serve deploy deploy/serve.yaml`),
    # add to the `applications` of the config file and deploy again:
    #   - name: summarizer
    #     route_prefix: /summarizer
    #     import_path: deploy.examples.compose_app:app
    #     runtime_env: {working_dir: "."}
    curl -X POST 127.0.0.1:8000/summarizer/summarize -H 'Content-Type: application/json' \
         -d '{"text": "Ray Serve is a scalable model serving library ..."}'
"""
from typing import AsyncIterator, Optional

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from raylm.engine.sampling_params import SamplingParams

api = FastAPI()


class SummarizeRequest(BaseModel):
    text: str
    max_tokens: int = 96


def summary_prompt(text: str) -> str:
    return f"Summarize the following text in one sentence.\n\nText: {text}\n\nSummary:"


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Summarizer:
    """Summaries by the `raylm` application, looked up by name when first needed (so
    the two applications can be deployed in either order)."""

    def __init__(self, llm_app: str = "raylm"):
        self.llm_app = llm_app
        self._llm: Optional[DeploymentHandle] = None

    @property
    def llm(self) -> DeploymentHandle:
        if self._llm is None:
            self._llm = serve.get_app_handle(self.llm_app)
        return self._llm

    def _params(self, req: SummarizeRequest) -> SamplingParams:
        return SamplingParams(max_tokens=req.max_tokens, temperature=0.0, stop=["\n\n"])

    @api.post("/summarize")
    async def summarize(self, req: SummarizeRequest) -> dict:
        out = await self.llm.generate.remote(summary_prompt(req.text), self._params(req))
        comp = out.outputs[0]
        return {"summary": comp.text.strip(), "finish_reason": comp.finish_reason,
                "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(comp.token_ids)}

    @api.post("/summarize/stream")
    async def summarize_stream(self, req: SummarizeRequest) -> StreamingResponse:
        gen = self.llm.options(stream=True).generate_stream.remote(summary_prompt(req.text),
                                                                   self._params(req))

        async def chunks() -> AsyncIterator[str]:
            sent, finished = 0, False
            try:
                async for out in gen:  # cumulative outputs: send what is new
                    finished = out.finished
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
            finally:
                if not finished:  # the HTTP client left: stop generating
                    gen.cancel()

        return StreamingResponse(chunks(), media_type="text/plain")


app = Summarizer.bind()


def main(argv=None) -> None:
    """Start raylm and the Summarizer in a local Ray, call both endpoints, shut down."""
    import argparse
    import os

    import httpx
    import ray

    from raylm.cluster.app import build_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir, .gguf file or hub id")
    parser.add_argument("--port", type=int, default=8000)
    ns = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
        serve.run(build_app({"model": ns.model}), name="raylm", route_prefix="/")
        serve.run(app, name="summarizer", route_prefix="/summarizer")
        text = {"text": "Ray Serve is a scalable model serving library for building online "
                        "inference APIs. It is framework-agnostic and composes models in Python."}
        base = f"http://127.0.0.1:{ns.port}/summarizer"
        print(httpx.post(f"{base}/summarize", json=text, timeout=120).json())
        with httpx.stream("POST", f"{base}/summarize/stream", json=text, timeout=120) as resp:
            for chunk in resp.iter_text():
                print(chunk, end="", flush=True)
        print()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

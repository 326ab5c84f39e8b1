"""python -m app: the playground (and API) on one server over one engine."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve one base model with many LoRA adapters: a Gradio playground at / "
                    "and an OpenAI-compatible API under /v1, all in one shared decode loop.")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, embedded), a Hugging Face folder, a "
                        ".gguf file, or random:NAME (tiny, llama-2-7b, ...). Default: default")
    p.add_argument("--adapters", default="adapters", metavar="DIR",
                   help="register every PEFT adapter folder inside DIR at start-up "
                        "(default: adapters/, the sample adapters)")
    p.add_argument("--lazy-adapters", action="store_true",
                   help="register the --adapters folders from their config and safetensors "
                        "header only and read the weights when a request first needs them "
                        "(fast start-up with thousands of adapters; a bad weight value then "
                        "fails that request instead of being refused at start-up)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a folder the API may load adapters from by path (repeatable); "
                        "nothing outside these folders is read")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--engines", type=int, default=1,
                   help="run N engines (one per GPU) as Ray actors behind Punica's "
                        "consolidating router (default 1: one engine in this process)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most requests decoding together in one step (default 32)")
    p.add_argument("--max-adapters-on-gpu", type=int, default=8,
                   help="adapter slots on the device; others wait in host memory (default 8)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, run every step eagerly instead of replaying captured CUDA "
                        "graphs (slower; for debugging)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queue bound; beyond it requests are refused with 'busy' (default 256)")
    p.add_argument("--no-upload", action="store_true",
                   help="disable adapter uploads in the playground and the API")
    p.add_argument("--max-upload-mb", type=int, default=64, help="upload size limit (default 64)")
    p.add_argument("--upload-dir", default=None,
                   help="where uploaded adapters are kept (default: a temporary folder)")
    p.add_argument("--api-key", default=os.environ.get("PUNICA_API_KEY"),
                   help="require this bearer key on /v1 routes (or set PUNICA_API_KEY)")
    return p.parse_args(argv)


def server_config(args: argparse.Namespace):
    from .state import ServerConfig
    return ServerConfig(model=args.model, adapters_dir=args.adapters,
                        lazy_adapters=args.lazy_adapters,
                        adapter_dirs=tuple(args.adapter_dir), upload_dir=args.upload_dir,
                        device=args.device, host=args.host, port=args.port,
                        max_batch=args.max_batch, max_adapters_on_gpu=args.max_adapters_on_gpu,
                        max_waiting=args.max_waiting, allow_upload=not args.no_upload,
                        max_upload_mb=args.max_upload_mb, api_key=args.api_key,
                        engines=args.engines, cuda_graphs=not args.enforce_eager)


def main(argv=None) -> None:
    args = parse_args(argv)
    import uvicorn

    from .server import build_state, create_app

    cfg = server_config(args)
    state = build_state(cfg)
    app = create_app(state)
    print(f"[punica] playground: http://{args.host}:{args.port}/   "
          f"API: http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

